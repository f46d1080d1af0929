"""The oracle generator: the data stage's unlabelled pool served as if it were generated.

With `data.n_labelled` set, the data stage writes the training images that lost their labels to
unlabelled.h5 beside train.h5 (seeded random order, every label -1). This generator is the stand-in for an
ideal generator, or for extra real data as in Carmon et al. (2019): the teacher pseudo-labels its images
like any generator's. "Training" checks the pool and records its path, size and content sha256 as the
manifest model.pt (a new pool is a new manifest, so its shards are redone); image i is row i of the pool,
and its label is always -1, so no stage after the data stage can see a true label. The pool's order is
random, so the first n images are a random subset of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import torch

from pipeline.checkpoint import save_atomic
from pipeline.generators.base import SampleSettings
from pipeline.labels import UNLABELLED
from pipeline.shards import ShardError, read_attrs, verify_imageset

log = logging.getLogger("pipeline.generators.oracle")
NAME = "oracle"
POOL = "unlabelled.h5"   # written by the data stage beside train.h5


@dataclass(frozen=True)
class Config:
    """params.yaml `train_generator.oracle:` (empty: the pool is the data stage's, data.n_labelled)."""
    SCHEMA_DESCRIPTION: ClassVar[str] = ("nothing to set - the data stage's unlabelled pool (data.n_labelled) served "
                                         "as generated images")


def pool_path(train_h5: Path) -> Path:
    return Path(train_h5).with_name(POOL)


def train(cfg: Config, train_h5: Path, workdir: Path, out: Path, seed: int, device: torch.device) -> None:
    """Check the pool (complete, unlabelled, not empty) and write its manifest."""
    pool = pool_path(train_h5)
    attrs = verify_imageset(pool)
    with h5py.File(pool, "r") as h5:
        labels = h5["labels"][()]
    if (labels != UNLABELLED).any():
        raise ShardError(f"{pool}: holds labels; the oracle serves only the data stage's unlabelled pool")
    if not len(labels):
        raise ShardError(f"{pool}: empty; set data.n_labelled to keep labels for only part of the training "
                         "images and pool the rest")
    log.info("%s: %d unlabelled images, sha256 %s", pool, len(labels), str(attrs["sha256"])[:12])
    save_atomic({"kind": NAME, "source": str(pool), "n": int(len(labels)), "sha256": str(attrs["sha256"])}, out)


class OracleSampler:
    """Index i is row i of the pool, label -1; the pool's checksum is re-checked so a new one is caught."""

    name = NAME

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.path, self.n = Path(manifest["source"]), int(manifest["n"])
        found = read_attrs(self.path).get("sha256")
        if found != manifest["sha256"]:
            raise ShardError(f"{self.path}: changed since train_generator recorded it (sha256 {str(found)[:12]}, "
                             f"recorded {manifest['sha256'][:12]}); rerun train_generator")

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if stop > self.n:
            raise ShardError(f"{self.path}: has {self.n} images, asked for index {stop - 1} "
                             "(generate.n_images too large for the pool)")
        with h5py.File(self.path, "r") as h5:
            images = h5["images"][start:stop]
        return images, np.full(stop - start, UNLABELLED, dtype=np.int64)

    def provenance(self) -> dict[str, Any]:
        return {"sampler": NAME, "steps": 0}


def load(model: Path, settings: SampleSettings, device: torch.device) -> OracleSampler:
    manifest = torch.load(model, map_location="cpu", weights_only=False)
    if manifest.get("kind") != NAME:
        raise ValueError(f"{model}: not an oracle manifest (kind {manifest.get('kind')!r})")
    return OracleSampler(manifest)
