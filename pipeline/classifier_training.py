"""Pieces shared by every standard (non-robust) classifier loop: augmentation, batched inference.

The teacher trains with them; pseudo-labelling and the analysis run the trained model through
`predict`/`features` in batches. Randomness comes from explicit torch.Generator objects, so a resumed
epoch draws exactly the same crops, flips and order as an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
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


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: random crop from a zero-padded image and horizontal flip.

    Offsets and flips are drawn on the CPU from `generator`, so they do not depend on the device.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    # Gather every crop at once: index rows/columns per image (no Python loop over the batch).
    rows = (offsets[:, 0:1] + torch.arange(h)).to(x.device)  # n x h
    cols = (offsets[:, 1:2] + torch.arange(w)).to(x.device)  # n x w
    cols = torch.where(flips.to(x.device).unsqueeze(1), cols.flip(1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.unsqueeze(2), cols.unsqueeze(1)]  # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()


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
