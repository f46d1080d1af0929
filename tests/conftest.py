"""Shared fixtures: tiny params built from the shipped default, the shipped demo CIFAR-10 subset, small
training sets and generated shards, and whole-DAG runs. Plain functions and constants: tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import params as params_mod
from pipeline.shards import read_imageset, write_imageset
from tests.helpers import BIN, DEMO_ARCHIVE, REPO, env, first_images, make_generated, make_workdir, run, tiny_config


def _threads() -> int:
    """OMP_NUM_THREADS when set (make test-fast sets 1: on a busy machine two threads per process keep
    waiting on each other for a core, many times slower than one), else one or two."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, min(2, os.cpu_count() or 1))


torch.set_num_threads(_threads())


@pytest.fixture
def tiny_params() -> dict:
    """A validated params dict: configs/default.yaml with tests/params.yaml laid over it."""
    return tiny_config()


@pytest.fixture
def write_params(tmp_path):
    """Write a params dict to a file a stage CLI can read; returns the path."""
    def write(cfg: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


@pytest.fixture(scope="session")
def cifar_sets(tmp_path_factory) -> dict[str, Path]:
    """train/val/test HDF5 sets made by the data stage from the shipped demo archive (real images)."""
    from pipeline import data

    out = tmp_path_factory.mktemp("cifar10")
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg = params_mod.section(data.DataConfig, default["data"])
    sets = data.split(cfg, 0, *data.read_batches(DEMO_ARCHIVE), num_classes=10)
    paths = {}
    for name, (images, labels) in sets.items():
        paths[name] = out / f"{name}.h5"
        write_imageset(paths[name], images, labels)
    return paths


# --- small sets for training-stage tests (module scope: each module that uses them makes its own) ---


@pytest.fixture(scope="module")
def small_sets(cifar_sets, tmp_path_factory) -> dict[str, Path]:
    """The first 256 training and 16 validation images of the demo sets (keeps each run to seconds)."""
    return first_images(cifar_sets, tmp_path_factory.mktemp("small"), {"train": 256, "val": 16})


@pytest.fixture(scope="module")
def small_train(tmp_path_factory, cifar_sets) -> Path:
    """The first 160 demo training images (CVAE training)."""
    path = tmp_path_factory.mktemp("cvae") / "train.h5"
    images, labels = read_imageset(cifar_sets["train"])
    write_imageset(path, images[:160], labels[:160])
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path]:
    """3 shards of 40 random images and their pseudo-label sidecars: (shard dir, label dir)."""
    return make_generated(tmp_path_factory.mktemp("gen"), n_shards=3, per_shard=40)


# --- whole-DAG runs, shared by the workflow, DVC-remote and SLURM tests (each costs minutes) ---


@pytest.fixture(scope="session")
def snakemake_run(tmp_path_factory) -> Path:
    """A test-scale copy of the workflow after `snakemake --cores 2 results/cifar10_table.csv`."""
    workdir = make_workdir(tmp_path_factory.mktemp("snakemake"))
    run([str(BIN / "snakemake"), "--cores", "2", "results/cifar10_table.csv"], workdir)
    return workdir


@pytest.fixture(scope="session")
def dvc_remote(tmp_path_factory) -> Path:
    """An empty directory used as the DVC remote of `dvc_repo`."""
    return tmp_path_factory.mktemp("dvc-remote")


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory, dvc_remote) -> Path:
    """A git repo holding a test-scale copy of the workflow after `dvc repro`, committed (no `dvc init`:
    the committed .dvc/config came with the workflow files, as in a fresh clone)."""
    repo = make_workdir(tmp_path_factory.mktemp("dvc") / "origin")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "ci@example.com"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(dvc_remote)], repo)
    (repo / ".gitignore").write_text(".snakemake/\n/work/*\n!/work/params.ok\n/logs/\n/benchmarks/\n")
    # Every compute job of `snakemake_run` runs on 2 threads (its rules ask for 2 or more, --cores 2); CPU
    # kernels sum in a thread-count-dependent order, so the same tables need the same threads under DVC.
    run([str(BIN / "dvc"), "repro"], repo, {**env(), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "test-scale run"], repo)
    return repo
