"""SIGKILL / SIGTERM during DDPM training, sampling, pseudo-labelling and evaluation.

Each test runs the stage CLI once uninterrupted (the reference), then again with a signal sent once it
has made progress worth losing (a checkpoint, a first shard, a first sidecar, a first finished chunk),
and reruns the same command: it must complete, keep the finished work it found, leave no
finished-looking partial output, and end with the reference's bytes or weights.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import checkpoint, models, shards
from pipeline.shards import read_arrays, read_imageset, write_imageset
from tests.faults.harness import files_matching, interrupt, run
from tests.helpers import same_weights, tiny_config

pytestmark = pytest.mark.slow   # stage subprocesses, each run several times

SIGNALS = pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, cifar_sets):
    """A work folder with a 256-image training set (the stages below only need a little data)."""
    folder = tmp_path_factory.mktemp("stages")
    images, labels = read_imageset(cifar_sets["train"])
    write_imageset(folder / "train.h5", images[:256], labels[:256])
    return folder


# --- DDPM generator training: 12 steps, a checkpoint every 2 ---


def ddpm_command(params: Path, train: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.train_generator", "--params", str(params), "--generator", "ddpm",
            "--train", str(train), "--workdir", str(out / "work"), "--out", str(out / "model.pt")]


@pytest.fixture(scope="module")
def ddpm_setup(root):
    cfg = tiny_config()
    cfg["train_generator"]["ddpm"].update(train_steps=12, checkpoint_every=2, batch_size=16, dropout=0.1)
    params = write(cfg, root / "ddpm-params.yaml")
    run(ddpm_command(params, root / "train.h5", root / "ddpm-whole"))
    return params, torch.load(root / "ddpm-whole" / "model.pt", weights_only=False)


@SIGNALS
def test_ddpm_training_killed_then_rerun_equals_uninterrupted(root, ddpm_setup, sig, tmp_path):
    params, reference = ddpm_setup
    args = ddpm_command(params, root / "train.h5", tmp_path)
    killed = interrupt(args, files_matching(tmp_path / "work", "step-*.pt"), sig)
    assert killed.returncode != 0
    assert not (tmp_path / "model.pt").exists()
    if sig == signal.SIGTERM:
        assert killed.returncode == 143 and "SIGTERM: checkpoint" in killed.stderr, killed.stderr[-2000:]
        assert max(p.stat().st_mtime for p in (tmp_path / "work").glob("step-*.pt")) >= killed.signalled_at
    assert checkpoint.latest(tmp_path / "work")["step"] < 12
    run(args)
    model = torch.load(tmp_path / "model.pt", weights_only=False)
    assert same_weights(model["state_dict"], reference["state_dict"])   # EMA UNet, bit for bit


# --- sampling: `--shard all` writes 4 DDPM shards one after the other ---


@pytest.fixture(scope="module")
def sampling_setup(root, ddpm_setup):
    cfg = tiny_config()
    cfg["generate"].update(n_images=64, shard_size=16, batch_size=16, sampling_steps=10, sampler="ddpm")
    params = write(cfg, root / "sample-params.yaml")
    model = root / "ddpm-whole" / "model.pt"
    run(sample_command(params, model, root / "sample-whole"))
    return params, model, {p.name: p.read_bytes() for p in shards.expand([root / "sample-whole"])}


def sample_command(params: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.generate", "--params", str(params), "--generator", "ddpm",
            "--model", str(model), "--shard", "all", "--out-dir", str(out)]


@SIGNALS
def test_sampling_killed_then_rerun_keeps_finished_shards_and_equals_uninterrupted(sampling_setup, sig,
                                                                                   tmp_path):
    params, model, reference = sampling_setup
    out = tmp_path / "shards"
    killed = interrupt(sample_command(params, model, out), files_matching(out, "shard-*.h5"), sig)
    assert killed.returncode != 0
    finished = {p: p.stat().st_mtime_ns for p in shards.expand([out])}
    assert 0 < len(finished) < len(reference)
    for path in finished:                      # whatever carries a final name is complete and verified
        shards.verify_imageset(path)
    run(sample_command(params, model, out))
    assert {p.name: p.read_bytes() for p in shards.expand([out])} == reference
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())   # not sampled again


# --- pseudo-labelling: `--shards` a folder labels 6 shards of 2,000 images one after the other ---


@pytest.fixture(scope="module")
def label_setup(root):
    rng = np.random.default_rng(0)
    folder = root / "to-label"
    for index in range(6):
        images = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
        write_imageset(folder / f"shard-{index:05d}.h5", images, np.full(2000, -1),
                       {"generator": "gaussian", "seed": 0})
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    models.save_checkpoint(teacher, models.build("small_cnn", 10), "small_cnn", 10)
    params = write(tiny_config(), root / "label-params.yaml")
    run(label_command(params, teacher, folder, root / "labels-whole"))
    return params, teacher, folder, {p.name: p.read_bytes() for p in (root / "labels-whole").iterdir()}


def label_command(params: Path, teacher: Path, folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.pseudolabel", "--params", str(params), "--teacher", str(teacher),
            "--shards", str(folder), "--out-dir", str(out)]


@SIGNALS
def test_pseudolabelling_killed_then_rerun_equals_uninterrupted(label_setup, sig, tmp_path):
    params, teacher, folder, reference = label_setup
    out = tmp_path / "labels"
    killed = interrupt(label_command(params, teacher, folder, out), files_matching(out, "shard-*.h5"), sig)
    assert killed.returncode != 0
    written = sorted(out.glob("shard-*.h5"))
    assert 0 < len(written) < len(reference)
    for path in written:                       # every sidecar with a final name verifies
        read_arrays(path, verify=True)
    run(label_command(params, teacher, folder, out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference


# --- evaluation: 4 chunks of 12 images; AutoAttack's per-chunk results survive a kill ---


@pytest.fixture(scope="module")
def eval_setup(root, cifar_sets):
    cfg = tiny_config()
    cfg["evaluate"].update(n_eval=48, chunk_size=12, batch_size=12, n_sweep=12)
    params = write(cfg, root / "eval-params.yaml")
    torch.manual_seed(0)
    model = root / "robust.pt"
    models.save_checkpoint(model, models.build("small_cnn", 10), "small_cnn", 10)
    run(eval_command(params, model, cifar_sets["test"], root / "eval-whole"))
    return params, model, read_arrays(root / "eval-whole" / "linf.h5"), \
        json.loads((root / "eval-whole" / "linf.json").read_text())


def eval_command(params: Path, model: Path, test: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.evaluate", "--params", str(params), "--run", "baseline",
            "--model", str(model),
            "--test", str(test), "--threat", "linf", "--workdir", str(out / "work"),
            "--out", str(out / "linf.json"), "--out-examples", str(out / "linf.h5")]


@SIGNALS
def test_evaluation_killed_then_rerun_keeps_finished_chunks(eval_setup, cifar_sets, sig, tmp_path):
    params, model, reference, report = eval_setup
    args = eval_command(params, model, cifar_sets["test"], tmp_path)
    killed = interrupt(args, files_matching(tmp_path / "work", "chunk-*.h5"), sig)
    assert killed.returncode != 0
    assert not (tmp_path / "linf.json").exists() and not (tmp_path / "linf.h5").exists()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("chunk-*.h5")}
    assert 0 < len(finished) < 4
    run(args)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())   # not attacked again
    resumed = read_arrays(tmp_path / "linf.h5")
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    resumed_report = json.loads((tmp_path / "linf.json").read_text())
    for key in ("clean_acc", "pgd_acc", "autoattack_acc", "flags", "sweep", "model_sha256"):
        assert resumed_report[key] == report[key], key
