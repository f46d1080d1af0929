"""What every generator shares: the sampler contract, the sampling settings, index tiling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.labels import UNLABELLED  # re-exported: the samplers' "class unknown"

__all__ = ["UNLABELLED", "SampleSettings", "Sampler", "tiled", "to_uint8"]


class Sampler(Protocol):
    name: str

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images (uint8 N x 32 x 32 x 3) and labels (int64 N, -1 = unknown) of indices [start, stop)."""

    def provenance(self) -> dict[str, Any]:
        """Shard attributes the bytes depend on besides checkpoint, seed and index range."""


@dataclass(frozen=True)
class SampleSettings:
    """What a sampler needs from params `base:` and `generate:`."""
    seed: int              # base.seed
    batch_size: int        # generate.batch_size
    sampler: str           # generate.sampler (ddpm only)
    sampling_steps: int    # generate.sampling_steps (ddpm only)
    ddpm_variance: str     # generate.ddpm_variance (ddpm generator, ancestral sampler only)
    edm_steps: int         # generate.edm_steps (edm: Heun steps, 2N - 1 network calls)

    @classmethod
    def from_params(cls, cfg: dict[str, Any]) -> SampleSettings:
        """The settings of validated params (no second defaults: every value is params')."""
        generate = cfg["generate"]
        return cls(seed=cfg["base"]["seed"], batch_size=generate["batch_size"], sampler=generate["sampler"],
                   sampling_steps=generate["sampling_steps"], ddpm_variance=generate["ddpm_variance"],
                   edm_steps=generate["edm_steps"])


def tiled(start: int, stop: int, tile: int,
          compute: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate `compute` on whole tiles [k*tile, (k+1)*tile) covering [start, stop) and cut the range.

    Float kernels (BLAS, oneDNN, cuDNN) round differently for different batch shapes, so an image is
    bit-reproducible only if it is always computed at the same position of a same-sized call. Aligning
    the calls to global index multiples makes that true whatever range, shard or order was asked for.
    """
    images, labels = [], []
    first = start - start % tile
    for lo in range(first, stop, tile):
        tile_images, tile_labels = compute(lo, lo + tile)
        cut = slice(max(start, lo) - lo, min(stop, lo + tile) - lo)
        images.append(tile_images[cut])
        labels.append(tile_labels[cut])
    if not images:
        return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


def to_uint8(x: Any) -> np.ndarray:
    """[0, 1] float tensor N x C x H x W -> uint8 N x H x W x C, rounding to nearest."""
    import torch

    x = torch.as_tensor(x).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
