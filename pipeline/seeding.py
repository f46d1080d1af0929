"""Seeds derived from names and indices, so results never depend on order, batch size or device count.

Like EDM's sampler: each generated image gets its own generator seeded from (base seed, generator
name, global image index), so "regenerate shard 417" reproduces the same bytes on the same kind of
device with the same software. The seeds are the same everywhere, but the arithmetic is not: CUDA
kernels round differently from the CPU and from one GPU type to another (and a CUDA generator draws
other numbers than a CPU one), so generated shards record the device they were sampled on
(pipeline/generate.py, attribute `device`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numpy_rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(derive(*parts))


def torch_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive(*parts))
    return generator
