"""Teacher stage: learns real CIFAR-10 (demo subset) above chance; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import torch

from pipeline import checkpoint, models, teacher


def run_cli(params, sets, workdir, out_dir):
    teacher.main(["--params", str(params), "--train", str(sets["train"]), "--test", str(sets["test"]),
                  "--workdir", str(workdir), "--out-model", str(out_dir / "model.pt"),
                  "--out-metrics", str(out_dir / "metrics.json")])
    return json.loads((out_dir / "metrics.json").read_text())


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


def test_workdir_of_another_run_is_refused(tiny_params, cifar_sets, tmp_path):
    import pytest
    from pipeline import params as P
    from pipeline.shards import read_imageset

    cfg = P.section(teacher.TeacherConfig, {**tiny_params["teacher"], "epochs": 1})
    x, y = read_imageset(cifar_sets["train"])
    small = (x[:64], y[:64])
    checkpoint.save(tmp_path, 1, {"identity": {"config": "something else"}})
    with pytest.raises(RuntimeError, match="another teacher run"):
        teacher.train_teacher(cfg, 0, small, small, tmp_path, torch.device("cpu"))
