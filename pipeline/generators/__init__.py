"""Generator registry: each entry fits (or validates) a generator and samples images by global index.

A generator module provides `Config` (frozen dataclass mirroring params `train_generator.<name>`),
`train(cfg, train_h5, workdir, out, seed, device)` writing model.pt, and `load(model, settings,
device)` returning a `Sampler` whose `sample(start, stop)` gives the same bytes for an index whatever
range it was asked for together with: that is what makes shards independent of order and batching.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pipeline.generators import cvae, ddpm, edm, gaussian, imported, oracle
from pipeline.generators.base import UNLABELLED, Sampler, SampleSettings

GeneratorName = Literal["gaussian", "ddpm", "edm", "import", "cvae", "oracle"]   # GENERATORS' keys
GENERATORS: dict[str, ModuleType] = {"gaussian": gaussian, "ddpm": ddpm, "edm": edm, "import": imported,
                                     "cvae": cvae, "oracle": oracle}

__all__ = ["GENERATORS", "GeneratorName", "UNLABELLED", "SampleSettings", "Sampler", "get", "load"]


def get(name: str) -> ModuleType:
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[name]


def load(name: str, model: Path, settings: SampleSettings, device: Any) -> Sampler:
    return get(name).load(Path(model), settings, device)
