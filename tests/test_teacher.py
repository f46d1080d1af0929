"""Teacher stage: learns real CIFAR-10 (demo subset) above chance; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import checkpoint, models, teacher


def run_cli(params, sets, workdir, out_dir):
    teacher.main(["--params", str(params), "--train", str(sets["train"]), "--test", str(sets["test"]),
                  "--workdir", str(workdir), "--out-model", str(out_dir / "model.pt"),
                  "--out-metrics", str(out_dir / "metrics.json")])
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_teacher_cli_beats_chance_on_real_cifar(tiny_params, write_params, cifar_sets, tmp_path):
    tiny_params["teacher"].update(epochs=2, checkpoint_every=1)
    metrics = run_cli(write_params(tiny_params), cifar_sets, tmp_path / "work", tmp_path / "out")
    # 1900 real training images, 2 epochs of a small CNN: clearly above the 10% of guessing.
    assert metrics["test_acc"] > 0.18, metrics["test_acc"]
    assert len(metrics["train_loss"]) == 2 and metrics["train_loss"][1] < metrics["train_loss"][0]
    assert metrics["config"]["epochs"] == 2 and metrics["n_test"] == 500
    assert sorted(p.name for p in (tmp_path / "work").glob("step-*.pt")) == ["step-00000029.pt", "step-00000058.pt"]
    model = models.load_checkpoint(tmp_path / "out" / "model.pt", expected="small_cnn")
    assert not model.training


def test_resumed_run_equals_uninterrupted(tiny_params, cifar_sets, tmp_path):
    from pipeline import params as P
    from pipeline.shards import read_imageset

    cfg = P.section(teacher.TeacherConfig, {**tiny_params["teacher"], "epochs": 3, "checkpoint_every": 1,
                                            "batch_size": 32})
    x, y = read_imageset(cifar_sets["train"])
    train, test = (x[:192], y[:192]), (x[192:256], y[192:256])
    cpu = torch.device("cpu")
    full, metrics = teacher.train_teacher(cfg, 0, train, test, tmp_path / "a", cpu)
    # Simulate a kill during epoch 3: only the checkpoints up to epoch 2 survive; rerun in the same workdir.
    steps = sorted((tmp_path / "a").glob("step-*.pt"))
    steps[-1].unlink()
    resumed, metrics_resumed = teacher.train_teacher(cfg, 0, train, test, tmp_path / "a", cpu)
    assert metrics_resumed["train_loss"] == metrics["train_loss"]
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    # And a fresh workdir with a different seed really gives a different model (the check can fail).
    other, _ = teacher.train_teacher(cfg, 1, train, test, tmp_path / "b", cpu)
    assert not torch.equal(other.head.weight, full.head.weight)


def test_workdir_of_another_run_is_set_aside_not_resumed(tiny_params, cifar_sets, tmp_path):
    from pipeline import params as P
    from pipeline.shards import read_imageset

    cfg = P.section(teacher.TeacherConfig, {**tiny_params["teacher"], "epochs": 1})
    x, y = read_imageset(cifar_sets["train"])
    small = (x[:64], y[:64])
    checkpoint.save(tmp_path / "work", 1, {"identity": {"config": "something else"}})
    model, _ = teacher.train_teacher(cfg, 0, small, small, tmp_path / "work", torch.device("cpu"))
    fresh, _ = teacher.train_teacher(cfg, 0, small, small, tmp_path / "fresh", torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    (aside,) = (tmp_path / "work").glob("superseded-*")
    assert [p.name for p in aside.iterdir()] == ["step-00000001.pt"]   # the other run's work is kept


def small_teacher(tiny_params, cifar_sets, **overrides):
    from pipeline import params as P
    from pipeline.shards import read_imageset

    cfg = P.section(teacher.TeacherConfig, {**tiny_params["teacher"], "epochs": 2, "checkpoint_every": 5,
                                            "batch_size": 32, **overrides})
    x, y = read_imageset(cifar_sets["train"])
    return cfg, (x[:128], y[:128]), (x[128:160], y[128:160])


def test_sigterm_mid_epoch_checkpoints_and_resume_equals_uninterrupted(tiny_params, cifar_sets, tmp_path,
                                                                       monkeypatch):
    import os
    import signal

    import pytest
    import torch.nn.functional as F

    from pipeline.preemption import SIGTERM_EXIT, Preempted

    cfg, train, test = small_teacher(tiny_params, cifar_sets)   # 2 epochs x 4 steps, no periodic checkpoint
    cpu = torch.device("cpu")
    whole, metrics = teacher.train_teacher(cfg, 0, train, test, tmp_path / "whole", cpu)
    real_ce, calls = F.cross_entropy, {"n": 0}

    def preempting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:                      # epoch 2, step 2: a scheduler's notice arrives mid-step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_ce(*args, **kwargs)

    monkeypatch.setattr(teacher.F, "cross_entropy", preempting)
    with pytest.raises(Preempted) as stopped:
        teacher.train_teacher(cfg, 0, train, test, tmp_path / "cut", cpu)
    assert stopped.value.code == SIGTERM_EXIT
    saved = checkpoint.latest(tmp_path / "cut")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)    # the step in flight finished first
    monkeypatch.setattr(teacher.F, "cross_entropy", real_ce)
    resumed, metrics_resumed = teacher.train_teacher(cfg, 0, train, test, tmp_path / "cut", cpu)
    assert metrics_resumed["train_loss"] == metrics["train_loss"]
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_absurd_learning_rate_stops_with_the_last_good_checkpoint(tiny_params, write_params, cifar_sets,
                                                                  tmp_path):
    import pytest

    tiny_params["teacher"].update(epochs=3, checkpoint_every=1, lr=1e12, batch_size=32)
    tiny_params["data"]["n_train"] = 0
    params = write_params(tiny_params)
    with pytest.raises(SystemExit, match=r"error: teacher: loss is (nan|inf).*teacher\.lr"):
        run_cli(params, cifar_sets, tmp_path / "work", tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()
    for path in (tmp_path / "work").glob("step-*.pt"):   # whatever was kept holds finite weights
        state = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
