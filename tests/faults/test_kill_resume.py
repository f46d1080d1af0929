"""SIGKILL / SIGTERM during robust training: rerunning the same command resumes and ends bit-identical.

A baseline run of 4 epochs x 2 steps of 8 images (small_cnn, 1-step attacks), a checkpoint every 2 steps;
the signal goes in once the first checkpoint exists. The uninterrupted reference runs through the same
CLI with the same thread count, so the weights must be equal bit for bit.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import checkpoint
from tests.faults.harness import files_matching, interrupt, run
from tests.helpers import first_images, tiny_config

pytestmark = pytest.mark.slow   # stage subprocesses, each run several times

TINY = {"epoch_size": 16, "batch_size": 8, "epochs": 4, "attack_steps": 1, "val_pgd_steps": 1,
        "checkpoint_every": 2, "warmup_epochs": 0, "num_workers": 0}


@pytest.fixture(scope="module")
def setup(cifar_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    sets = first_images(cifar_sets, root, {"train": 128, "val": 8})
    cfg = tiny_config()
    cfg["train_robust"] = {**cfg["train_robust"], **TINY}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    return root, params, sets


def command(params: Path, sets: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.train_robust", "--params", str(params), "--run", "baseline",
            "--train", str(sets["train"]), "--val", str(sets["val"]), "--workdir", str(out / "work"),
            "--out-model", str(out / "model.pt"), "--out-best", str(out / "best.pt"),
            "--out-metrics", str(out / "metrics.json"), "--out-curve", str(out / "curve.csv")]


@pytest.fixture(scope="module")
def reference(setup):
    root, params, sets = setup
    out = root / "whole"
    run(command(params, sets, out))
    return torch.load(out / "model.pt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_train_robust_killed_then_rerun_equals_uninterrupted(setup, reference, sig, tmp_path):
    _, params, sets = setup
    out = tmp_path / "cut"
    args = command(params, sets, out)
    killed = interrupt(args, files_matching(out / "work", "step-*.pt"), sig)
    assert killed.returncode != 0
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()  # nothing finished-looking
    periodic = 2                                          # the checkpoint the signal waited for
    if sig == signal.SIGTERM:
        assert killed.returncode == 143, killed.stderr[-2000:]
        assert "SIGTERM: checkpoint" in killed.stderr
        # Saved on the signal, after the step in flight: a checkpoint written after the signal was sent.
        assert checkpoint.latest(out / "work")["step"] >= periodic
        assert max(p.stat().st_mtime for p in (out / "work").glob("step-*.pt")) >= killed.signalled_at
    resumed = run(args)
    assert "resumed at step" in resumed.stderr
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


# --- teacher: 4 epochs of 128 images, a checkpoint every epoch ---


@pytest.fixture(scope="module")
def teacher_setup(setup):
    root, _, sets = setup
    cfg = tiny_config()
    cfg["teacher"] = {**cfg["teacher"], "epochs": 4, "batch_size": 32, "checkpoint_every": 1}
    params = root / "teacher-params.yaml"
    params.write_text(yaml.safe_dump(cfg))
    reference = root / "teacher-whole"
    run(teacher_command(params, sets, reference))
    return params, sets, torch.load(reference / "model.pt", weights_only=False)["state_dict"]


def teacher_command(params: Path, sets: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.teacher", "--params", str(params), "--train", str(sets["train"]),
            "--test", str(sets["val"]), "--workdir", str(out / "work"), "--out-model", str(out / "model.pt"),
            "--out-metrics", str(out / "metrics.json")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_teacher_killed_then_rerun_equals_uninterrupted(teacher_setup, sig, tmp_path):
    params, sets, reference = teacher_setup
    out = tmp_path / "cut"
    args = teacher_command(params, sets, out)
    killed = interrupt(args, files_matching(out / "work", "step-*.pt"), sig)
    assert killed.returncode != 0
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    if sig == signal.SIGTERM:   # a checkpoint written on the signal, newer than the one it waited for
        assert max(p.stat().st_mtime for p in (out / "work").glob("step-*.pt")) >= killed.signalled_at
        assert killed.returncode == 143 and "SIGTERM: checkpoint" in killed.stderr, killed.stderr[-2000:]
    resumed = run(args)
    assert "resum" in resumed.stderr
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
