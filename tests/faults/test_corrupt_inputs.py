"""Corrupt or mismatched inputs fail fast with one line naming the file and what is wrong.

Each case goes through the stage's CLI entry point in-process (`main(argv)`), so what is checked is what
a user sees: a SystemExit whose message names the file, raised before any training or attack runs.
Also: NaN/inf from an absurd learning rate, and a batch that does not split over the ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from pipeline import checkpoint, evaluate, models, pseudolabel
from pipeline import params as params_mod
from pipeline import train_robust as tr
from pipeline.labels import load_labels
from pipeline.shards import ShardError, read_attrs, write_arrays, write_imageset
from tests.helpers import first_images

TINY = {"epoch_size": 16, "batch_size": 8, "epochs": 2, "attack_steps": 1, "val_pgd_steps": 1,
        "checkpoint_every": 1, "warmup_epochs": 0, "num_workers": 0}
FAST = 20.0  # seconds: "before any expensive work" on a loaded 2-core machine


@pytest.fixture
def small(cifar_sets, tmp_path):
    return first_images(cifar_sets, tmp_path, {"train": 64, "val": 8})


@pytest.fixture
def params(tiny_params, tmp_path):
    def write(**overrides) -> Path:
        cfg = dict(tiny_params)
        cfg["train_robust"] = {**cfg["train_robust"], **TINY, **overrides}
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


def shard(path: Path, n: int = 16, seed: int = 0, attrs: dict | None = None) -> Path:
    rng = np.random.default_rng(seed)
    write_imageset(path, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                   attrs or {})
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    """Flip one byte inside the stored pixels (found through HDF5, so the test cannot miss the data)."""
    with h5py.File(path, "r") as h5:
        dataset = h5["images"]
        offset = dataset.id.get_chunk_info(0).byte_offset if dataset.chunks else dataset.id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPT = {"truncated": truncate, "bit-flipped": flip}


def robust_args(params: Path, sets: dict, out: Path, run: str = "baseline", generated=()) -> list[str]:
    args = ["--params", str(params), "--run", run, "--train", str(sets["train"]), "--val", str(sets["val"]),
            "--workdir", str(out / "work"), "--out-model", str(out / "model.pt"),
            "--out-best", str(out / "best.pt"), "--out-metrics", str(out / "metrics.json"),
            "--out-curve", str(out / "curve.csv")]
    return args + (["--generated", *map(str, generated)] if generated else [])


def fails_fast(main, argv: list[str], *fragments: str) -> str:
    start = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = str(stopped.value.code)
    assert time.monotonic() - start < FAST
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("fault", sorted(CORRUPT))
def test_corrupt_shard_to_train_robust(fault, params, small, tmp_path):
    bad = shard(tmp_path / "gen" / "shard-00000.h5")
    CORRUPT[fault](bad)
    fails_fast(tr.main, robust_args(params(), small, tmp_path / "out", "gaussian", [bad]), str(bad))
    assert not (tmp_path / "out" / "work").exists() or not list((tmp_path / "out" / "work").glob("*.pt"))


@pytest.fixture
def teacher(tmp_path) -> Path:
    path = tmp_path / "teacher.pt"
    models.save_checkpoint(path, models.build("small_cnn", 10), "small_cnn", 10)
    return path


@pytest.mark.parametrize("fault", sorted(CORRUPT))
def test_corrupt_shard_to_pseudolabel(fault, tiny_params, write_params, teacher, tmp_path):
    bad = shard(tmp_path / "gen" / "shard-00000.h5")
    CORRUPT[fault](bad)
    out = tmp_path / "labels" / "shard-00000.h5"
    fails_fast(pseudolabel.main, ["--params", str(write_params(tiny_params)), "--teacher", str(teacher),
                                  "--shard", str(bad), "--out", str(out)], str(bad))
    assert not out.exists()


@pytest.mark.parametrize("attrs, fragment", [({"generator": "ddpm", "seed": 0}, "generator 'ddpm'"),
                                             ({"generator": "gaussian", "seed": 999}, "seed 999")],
                         ids=["other-generator", "other-seed"])
def test_shard_from_another_generator_or_seed(attrs, fragment, params, small, tiny_params, tmp_path):
    assert tiny_params["base"]["seed"] != 999
    path = shard(tmp_path / "gen" / "shard-00000.h5", attrs=attrs)
    fails_fast(tr.main, robust_args(params(), small, tmp_path / "out", "gaussian", [path]), str(path), fragment)


def test_sidecar_of_another_shard_is_refused(tmp_path):
    a = shard(tmp_path / "gen" / "shard-00000.h5", seed=1)
    b = shard(tmp_path / "gen" / "shard-00001.h5", seed=2)
    sidecar = tmp_path / "labels" / "shard-00000.h5"
    write_arrays(sidecar, {"label": np.zeros(16, dtype=np.int64), "confidence": np.ones(16, dtype=np.float32)},
                 {"shard": a.name, "shard_sha256": read_attrs(a)["sha256"]})
    load_labels(a, sidecar)                    # its own shard: fine
    with pytest.raises(ShardError, match=str(sidecar)):
        load_labels(b, sidecar)


def test_checkpoint_of_another_architecture_to_evaluate(tiny_params, write_params, cifar_sets, tmp_path):
    assert tiny_params["train_robust"]["model"] == "small_cnn"
    other = tmp_path / "model.pt"
    models.save_checkpoint(other, models.build("preact_resnet18", 10), "preact_resnet18", 10)
    fails_fast(evaluate.main, ["--params", str(write_params(tiny_params)), "--run", "baseline", "--model", str(other),
                               "--test", str(cifar_sets["test"]), "--threat", "linf",
                               "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "eval.json"),
                               "--out-examples", str(tmp_path / "examples.h5")],
               str(other), "preact_resnet18", "small_cnn")


def test_workdir_checkpoint_of_another_setting_is_set_aside(params, small, tmp_path):
    """A checkpoint of another architecture (any other setting) is neither resumed nor thrown away."""
    out = tmp_path / "out"
    checkpoint.save(out / "work", 1, {"step": 1, "total_steps": 4, "world_size": 1,
                                      "config": {"model": "preact_resnet18"}, "model": {}})
    tr.main(robust_args(params(), small, out))
    assert (out / "model.pt").exists()
    assert list((out / "work").glob("superseded-*/step-00000001.pt"))   # the user's state is kept aside


def test_absurd_learning_rate_stops_and_keeps_last_good_checkpoint(params, small, tmp_path):
    out = tmp_path / "out"
    fails_fast(tr.main, robust_args(params(lr=1e30), small, out), "loss is", "train_robust.lr")
    assert not (out / "model.pt").exists()
    saved = sorted((out / "work").glob("step-*.pt"))
    for path in saved:                                       # whatever was kept holds finite weights
        state = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_batch_not_divisible_by_ranks(tiny_params, small):
    cfg = params_mod.section(tr.TrainRobustConfig, {**tiny_params["train_robust"], **TINY})
    with pytest.raises(ValueError, match="train_robust.batch_size"):
        tr.make_dataset(cfg, 0, small["train"], [], [], None, tr.Dist(0, 3, 0))
