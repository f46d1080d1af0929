"""Pieces shared by every standard (non-robust) classifier loop: uint8 -> float conversion, batched
inference.

The teacher trains with them (its augmentation is pipeline/augment.py, as robust training's);
pseudo-labelling and the analysis run the trained model through `predict`/`features` in batches.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.attacks import eval_mode


def to_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC (as stored in image sets) -> float NCHW in [0, 1] on `device`."""
    tensor = torch.as_tensor(images)
    if tensor.dtype == torch.uint8:
        tensor = tensor.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    else:  # already float NHWC in [0, 1] (e.g. mixup blends)
        tensor = tensor.to(device).permute(0, 3, 1, 2).float()
    return tensor.contiguous()


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: np.ndarray,
                batch_size: int, device: torch.device, desc: str | None = None) -> np.ndarray:
    """Apply `fn` (e.g. model or model.features) to images in batches, in eval mode; float32 numpy."""
    outputs = []
    with eval_mode(model):
        for part in tqdm(list(batches(len(images), batch_size)), desc=desc, unit="batch",
                         disable=desc is None, leave=False):
            outputs.append(fn(to_float(images[part], device)).float().cpu().numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)


def predict(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
            desc: str | None = None) -> np.ndarray:
    """Softmax probabilities, N x classes (float32)."""
    logits = map_batches(model, model, images, batch_size, device, desc)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
             device: torch.device) -> float:
    """Top-1 accuracy in eval mode."""
    probs = predict(model, images, batch_size, device)
    return float((probs.argmax(1) == np.asarray(labels)).mean())
