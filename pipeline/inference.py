"""Images to model inputs, and a model run over many images in batches: one copy of each.

Every stage that feeds images to a network goes through `to_float` (the teacher, pseudo-labelling, the
analysis, robust training and its validation, both evaluations, the CVAE), and every stage that runs a
trained model over a set without gradients goes through `map_batches` (pseudo-labels, analysis
features, the teacher's test accuracy, robust training's clean validation, clean and AutoAttack
predictions of the evaluations), so a change of input scaling or of eval-mode handling happens once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.attacks import eval_mode

Layout = Literal["NHWC", "NCHW"]


def to_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu", *, layout: Layout = "NHWC",
             memory_format: torch.memory_format = torch.contiguous_format,
             non_blocking: bool = False) -> torch.Tensor:
    """Images -> float NCHW in [0, 1] on `device`.

    uint8 is divided by 255 after the move, so on a GPU the conversion runs there; float input is taken
    as already in [0, 1] (mixup blends). `layout` is the input's: NHWC as image sets store images,
    NCHW as the training loader's batches arrive. The result is dense in `memory_format`: contiguous by
    default (permuted strides would leak into gradients, and AutoAttack .view()s its inputs), or
    channels_last where the model runs channels_last; NHWC permuted to NCHW already is channels_last,
    so asking for it copies nothing.
    """
    if isinstance(images, np.ndarray):
        images = np.ascontiguousarray(images)   # torch cannot wrap negative strides; a no-op otherwise
    tensor = torch.as_tensor(images).to(device, non_blocking=non_blocking)
    if layout == "NHWC":
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div_(255)
    else:
        tensor = tensor.float()
    return tensor.contiguous(memory_format=memory_format)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most `batch_size` covering range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _model_input(batch: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):   # model inputs already (to_float's output, an attack's)
        return batch.to(device)
    return to_float(batch, device)


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: np.ndarray | torch.Tensor,
                batch_size: int, device: torch.device | str, desc: str | None = None) -> np.ndarray:
    """`fn` (the model itself, or e.g. `model.features`) on `images` in batches, with `model` in eval mode
    (its previous mode restored) and no gradients; float32 numpy, one row per image, in order.

    `images` are either as stored (uint8, or float in [0, 1], NHWC numpy), converted batch by batch so a
    whole shard never becomes one float tensor, or model inputs already (float NCHW tensors), moved
    batch by batch to `device` with their memory layout kept. Runs under whatever autocast the caller
    has entered.
    """
    outputs = []
    with eval_mode(model):
        for part in tqdm(list(batches(len(images), batch_size)), desc=desc, unit="batch",
                         disable=desc is None, leave=False):
            outputs.append(fn(_model_input(images[part], device)).float().cpu().numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)


def predict(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device | str,
            desc: str | None = None) -> np.ndarray:
    """Softmax probabilities, N x classes (float32)."""
    logits = map_batches(model, model, images, batch_size, device, desc)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def predict_labels(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int,
                   device: torch.device | str, desc: str | None = None) -> np.ndarray:
    """Arg-max class of each image (int64), from the logits (no softmax, which can round near-ties equal)."""
    logits = map_batches(model, model, images, batch_size, device, desc)
    return logits.argmax(1).astype(np.int64) if len(logits) else np.zeros(0, dtype=np.int64)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
             device: torch.device | str) -> float:
    """Top-1 accuracy in eval mode, as the arg-max of the softmax probabilities (the teacher's metric)."""
    probs = predict(model, images, batch_size, device)
    return float((probs.argmax(1) == np.asarray(labels)).mean())
