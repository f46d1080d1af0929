"""Shared fixtures: tiny params built from the shipped default, and the shipped demo CIFAR-10 subset."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import params as params_mod

REPO = Path(__file__).resolve().parent.parent
DEMO_ARCHIVE = REPO / "data" / "demo" / "cifar-10-demo-python.tar.gz"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_overrides() -> dict:
    """The smallest settings that still exercise every code path (tests/params.yaml holds them)."""
    return yaml.safe_load((REPO / "tests" / "params.yaml").read_text())


@pytest.fixture
def tiny_params() -> dict:
    """A validated params dict: configs/default.yaml with tests/params.yaml laid over it."""
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg = params_mod.deep_merge(default, tiny_overrides())
    cfg["data"]["archive"] = str(DEMO_ARCHIVE)
    return params_mod.validate(copy.deepcopy(cfg))


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
    sets = data.split(cfg, 0, *data.read_batches(DEMO_ARCHIVE))
    from pipeline.shards import write_imageset
    paths = {}
    for name, (images, labels) in sets.items():
        paths[name] = out / f"{name}.h5"
        write_imageset(paths[name], images, labels)
    return paths


# --- whole-DAG runs, shared by the workflow, DVC-remote and SLURM tests (each costs minutes) ---


@pytest.fixture(scope="session")
def snakemake_run(tmp_path_factory) -> Path:
    """A test-scale copy of the workflow after `snakemake --cores 2 results/cifar10_table.csv`."""
    from tests.test_workflow import BIN, make_workdir, run

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
    from tests.test_workflow import BIN, make_workdir, run

    repo = make_workdir(tmp_path_factory.mktemp("dvc") / "origin")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "ci@example.com"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(dvc_remote)], repo)
    (repo / ".gitignore").write_text(".snakemake/\n/work/*\n!/work/params.ok\n/logs/\n/benchmarks/\n")
    run([str(BIN / "dvc"), "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "test-scale run"], repo)
    return repo
