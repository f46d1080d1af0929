"""Functions and constants shared by the test modules (fixtures live in tests/conftest.py).

Test modules import from here, never from one another.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import params as params_mod
from pipeline.shards import read_attrs, read_imageset, write_arrays, write_imageset

REPO = Path(__file__).resolve().parent.parent
DEMO_ARCHIVE = REPO / "data" / "demo" / "cifar-10-demo-python.tar.gz"
BIN = Path(sys.executable).parent   # the venv's snakemake, dvc and python
# What a test-scale copy of the workflow needs (make_workdir).
WORKFLOW_FILES = ["Snakefile", "rules", "profiles", "envs", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
                  "configs", "data/demo"]
PRETRAINED_DDPM = "models/pretrained/ddpm-cifar10-tiny"   # the test DAG's stand-in for Ho et al.'s checkpoint
# The test DAG (make_workdir) is configs/default.yaml + tests/params.yaml + this: one generator of each kind,
# closed form (gaussian), trained in the DAG (edm, Heun sampler) and imported pretrained (ddpm).
# Their samples are far from CIFAR-10 at this scale, and the teacher gives some classes none of them, so
# select keeps the most confident half of each teacher class instead of balancing classes.
# AutoAttack's APGD-CE alone (the effect study's attack): the DAG tests test the plumbing (chunks, merge,
# table), and the standard version's later attacks spent three quarters of the DAG's time on the few
# survivors of the tiny models; tests/test_evaluate.py checks the standard version against the official code.
TEST_DAG = {"generate": {"generators": ["gaussian", "edm", "ddpm"]},
            "train_generator": {"ddpm": {"pretrained": PRETRAINED_DDPM}},
            "select": {"class_balance": False, "top_fraction": 0.5},
            "evaluate": {"version": "apgd-ce"}}


# --- params ---


def tiny_overrides() -> dict:
    """The smallest settings that still exercise every code path (tests/params.yaml holds them)."""
    return yaml.safe_load((REPO / "tests" / "params.yaml").read_text())


def sample_settings(**overrides: Any) -> Any:
    """The sampling settings of configs/default.yaml, seed 0, with `overrides` (SampleSettings fields)."""
    from pipeline.generators.base import SampleSettings

    settings = SampleSettings.from_params(params_mod.load(REPO / "configs" / "default.yaml"))
    return dataclasses.replace(settings, seed=0, **overrides)


def tiny_config() -> dict:
    """A validated params dict: configs/default.yaml with tests/params.yaml laid over it, reading the
    shipped demo archive (the `tiny_params` fixture, callable from fixtures of any scope)."""
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg = params_mod.deep_merge(default, tiny_overrides())
    cfg["data"]["archive"] = str(DEMO_ARCHIVE)
    return params_mod.validate(copy.deepcopy(cfg))


# 2 epochs x 2 steps of 8 images, 1-step attacks: the smallest robust run that crosses an epoch boundary.
TINY_ROBUST = {"epoch_size": 16, "batch_size": 8, "epochs": 2, "attack_steps": 1, "val_pgd_steps": 1}


def robust_cfg(tiny_params: dict, **overrides):
    """train_robust's config section at TINY_ROBUST scale, with `overrides`."""
    from pipeline import train_robust

    return params_mod.section(train_robust.TrainRobustConfig,
                              {**tiny_params["train_robust"], **TINY_ROBUST, **overrides})


def cvae_cfg(tiny_params: dict, **overrides):
    """The CVAE generator's config section of `tiny_params`, with `overrides`."""
    from pipeline.generators import cvae

    return dataclasses.replace(params_mod.section(cvae.Config, tiny_params["train_generator"]["cvae"]),
                               **overrides)


# --- data and models ---


def first_images(sets: dict[str, Path], out: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """HDF5 copies of the first n images of each named set (e.g. {"train": 256, "val": 16}) in `out`."""
    small = {}
    for name, n in sizes.items():
        images, labels = read_imageset(sets[name])
        small[name] = out / f"{name}.h5"
        write_imageset(small[name], images[:n], labels[:n])
    return small


def make_generated(root: Path, n_shards: int, per_shard: int, seed: int = 0) -> tuple[Path, Path]:
    """Shards of random images (label -1, like an unconditional generator) plus pseudo-label sidecars."""
    rng = np.random.default_rng(seed)
    for i in range(n_shards):
        shard = root / "gen" / f"shard-{i:05d}.h5"
        # Pixel (0, 0, 0) encodes the shard, (0, 1, 0) the row mod 256: lets tests see where an image came from.
        images = rng.integers(0, 256, (per_shard, 32, 32, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = i
        images[:, 0, 1, 0] = np.arange(per_shard) % 256
        write_imageset(shard, images, -np.ones(per_shard, dtype=np.int64))
        write_arrays(root / "labels" / shard.name,
                     {"label": rng.integers(0, 10, per_shard).astype(np.int64),
                      "confidence": np.ones(per_shard, dtype=np.float32)},
                     {"shard": shard.name, "shard_sha256": read_attrs(shard)["sha256"]})
    return root / "gen", root / "labels"


def same_weights(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- commands and test-scale workflow copies ---


def env() -> dict[str, str]:
    """The environment for commands: the venv's tools first on PATH, one OpenMP thread unless set."""
    environment = dict(os.environ)
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    environment.setdefault("OMP_NUM_THREADS", "1")
    return environment


def run(args: list[str], cwd: Path | None = None, environment: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output (and the tail of any job logs under cwd/logs)."""
    result = subprocess.run(args, cwd=cwd, env=environment or env(), capture_output=True, text=True)
    if result.returncode != 0:
        logs_dir = Path(cwd) / "logs" if cwd is not None else None
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(logs_dir.rglob("*.log"))) \
            if logs_dir is not None and logs_dir.exists() else ""
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                    f"{result.stderr[-4000:]}\n{logs}")
    return result


def die_after_checkpoint(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """checkpoint.save writes the step-`at_step` checkpoint, then the run dies (a kill between steps)."""
    from pipeline import checkpoint

    real_save = checkpoint.save

    def save_then_die(workdir: Path, step: int, state: dict, keep: int = 2) -> Path:
        path = real_save(workdir, step, state, keep)
        if step == at_step:
            raise KeyboardInterrupt(f"killed after the step-{at_step} checkpoint")
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_die)


def small_unet(**overrides: Any) -> Any:
    """A small diffusers UNet (random weights, seeded): the stand-in for a pretrained DDPM."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    kwargs = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, attention_head_dim=8)
    return UNet2DModel(**{**kwargs, **overrides})


def save_pipeline(folder: Path, unet: Any, scheduler: Any) -> Path:
    """The layout DDPMPipeline.save_pretrained writes (google/ddpm-cifar10-32's): unet/, scheduler/, model_index."""
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


def make_workdir(path: Path) -> Path:
    """A copy of the workflow files in `path` with params.yaml = configs/default.yaml + tests/params.yaml +
    TEST_DAG, and the pretrained DDPM folder TEST_DAG names (a small random UNet with Ho et al.'s schedule,
    in the layout of google/ddpm-cifar10-32)."""
    from diffusers import DDPMScheduler

    save_pipeline(path / PRETRAINED_DDPM, small_unet(), DDPMScheduler(beta_schedule="linear", clip_sample=True))
    for name in WORKFLOW_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, path / name)
        else:
            shutil.copy(REPO / name, path / name)
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    overlay = yaml.safe_load((REPO / "tests" / "params.yaml").read_text())
    cfg = params_mod.deep_merge(params_mod.deep_merge(default, overlay), TEST_DAG)
    save_params(path, cfg)
    return path


def save_params(workdir: Path, cfg: dict) -> dict:
    """Validate `cfg` and write it as the workdir's params.yaml, with the dvc.yaml that plans its runs (as
    `python -m pipeline.params use` does); the validated params."""
    from pipeline import dag

    cfg = params_mod.validate(copy.deepcopy(cfg))
    (workdir / "params.yaml").write_text(yaml.safe_dump(cfg))
    if (workdir / "dvc.yaml").exists():
        dag.write(workdir / "dvc.yaml", cfg)
    return cfg


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
