"""Class-conditional Gaussian in pixel space (the paper's motivating experiment, Gowal et al. 2021, Sec. 3).

Fit: per class, the mean and full 3072 x 3072 covariance of the training images (pixels in [0, 1], HWC
order) plus `ridge` on the diagonal, stored as the mean and the Cholesky factor L (packed lower
triangle, float32: 190 MB for CIFAR-10's ten classes, 1.9 GB for CIFAR-100; the fit holds K float64
factors, 7.5 GB for CIFAR-100). Sample: image i has class i % K (balanced, no RNG needed) and pixels
clip(mean + L z, 0, 1) with z drawn from its own generator seeded by (seed, "gaussian", i).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import seeding
from pipeline.checkpoint import save_atomic
from pipeline.generators.base import SampleSettings, tiled, to_uint8
from pipeline.params import key
from pipeline.shards import file_sha256, read_attrs, read_imageset

log = logging.getLogger("pipeline.generators.gaussian")
NAME = "gaussian"
TILE = 64  # images per matrix product, aligned to index multiples (bit-reproducibility, base.tiled)


@dataclass(frozen=True)
class Config:
    """params.yaml `train_generator.gaussian:`."""
    ridge: float = key("covariance diagonal regulariser", minimum=0)


def fit(images: np.ndarray, labels: np.ndarray, ridge: float, num_classes: int = 10
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean (K x D) and Cholesky factor (K x D x D) of images in [0, 1], in float64."""
    flat = torch.from_numpy(images.reshape(len(images), -1)).to(torch.float64) / 255.0
    dim = flat.shape[1]
    means = torch.zeros(num_classes, dim, dtype=torch.float64)
    chols = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
    for k in range(num_classes):
        x = flat[torch.from_numpy(labels == k)]
        if len(x) < 2:
            raise ValueError(f"class {k} has {len(x)} training images; a covariance needs at least 2")
        means[k] = x.mean(0)
        centred = x - means[k]
        cov = centred.T @ centred / (len(x) - 1)
        cov.diagonal().add_(ridge)
        chols[k] = torch.linalg.cholesky(cov)
        log.info("class %d: %d images, log det cov %.1f", k, len(x), 2 * chols[k].diagonal().log().sum())
    return means, chols


def train(cfg: Config, train_h5: Path, workdir: Path, out: Path, seed: int, device: torch.device) -> None:
    """Fit on the training set and write model.pt (no iterations, so nothing to resume in workdir)."""
    images, labels = read_imageset(train_h5)
    # the data stage records the class count (CIFAR-100: 100); older sets without it are CIFAR-10
    num_classes = int(read_attrs(train_h5).get("num_classes", 10))
    means, chols = fit(images, labels, cfg.ridge, num_classes)
    dim = means.shape[1]
    rows, cols = torch.tril_indices(dim, dim)
    state = {
        "kind": NAME,
        "image_shape": list(images.shape[1:]),
        "mean": means.to(torch.float32),
        "chol_packed": chols[:, rows, cols].to(torch.float32),  # half the bytes of the full factor
        "ridge": cfg.ridge,
        "counts": np.bincount(labels, minlength=num_classes).tolist(),
        "train_sha256": file_sha256(train_h5),
    }
    save_atomic(state, out)


class GaussianSampler:
    name = NAME

    def __init__(self, state: dict[str, Any], settings: SampleSettings, device: torch.device) -> None:
        self.seed = settings.seed
        self.shape = tuple(state["image_shape"])
        self.mean = state["mean"].to(device)
        dim = self.mean.shape[1]
        rows, cols = torch.tril_indices(dim, dim)
        self.chol = torch.zeros(len(self.mean), dim, dim, dtype=torch.float32)
        self.chol[:, rows, cols] = state["chol_packed"]
        self.chol = self.chol.to(device)
        self.device = device

    def _tile(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        dim = self.mean.shape[1]
        z = torch.stack([torch.randn(dim, generator=seeding.torch_generator(self.seed, NAME, i))
                         for i in range(lo, hi)]).to(self.device)
        labels = np.arange(lo, hi, dtype=np.int64) % len(self.mean)
        x = torch.empty_like(z)
        with torch.inference_mode():
            for k in range(len(self.mean)):  # the same grouping for a given tile, wherever it is computed
                rows = torch.from_numpy(labels == k).to(self.device)
                x[rows] = self.mean[k] + z[rows] @ self.chol[k].T
        x = x.view(len(x), *self.shape).permute(0, 3, 1, 2)  # stored HWC, to_uint8 expects NCHW
        return to_uint8(x), labels

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return tiled(start, stop, TILE, self._tile)

    def provenance(self) -> dict[str, Any]:
        return {"sampler": "cholesky", "steps": 1, "tile": TILE}


def load(model: Path, settings: SampleSettings, device: torch.device) -> GaussianSampler:
    state = torch.load(model, map_location="cpu", weights_only=False)
    if state.get("kind") != NAME:
        raise ValueError(f"{model}: not a gaussian generator (kind {state.get('kind')!r})")
    return GaussianSampler(state, settings, device)
