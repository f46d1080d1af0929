"""Robust training stage: resume equals uninterrupted, SIGTERM and NaN handling, CLI outputs, DDP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, losses, models
from pipeline import params as P
from pipeline import train_robust as tr
from tests.helpers import REPO, TINY_ROBUST, make_generated, robust_cfg, same_weights


def run(cfg, small_sets, generated, workdir, stop_after=None, name="gaussian"):
    gen = [generated[0]] if name != "baseline" else []
    lab = [generated[1]] if name != "baseline" else []
    return tr.train_robust(cfg, 0, "cpu", name, small_sets["train"], small_sets["val"], gen, lab,
                           workdir, stop_after=stop_after, progress=False)


def test_resumed_run_equals_uninterrupted(tiny_params, small_sets, generated, tmp_path):
    cfg = robust_cfg(tiny_params, checkpoint_every=2)      # 2 epochs x 2 steps; stop mid-epoch at 3
    whole = run(cfg, small_sets, generated, tmp_path / "whole")
    with pytest.raises(tr.Preempted) as stopped:
        run(cfg, small_sets, generated, tmp_path / "cut", stop_after=3)
    assert stopped.value.code == tr.SIGTERM_EXIT
    assert checkpoint.latest(tmp_path / "cut")["step"] == 3
    resumed = run(cfg, small_sets, generated, tmp_path / "cut")
    assert same_weights(whole.ema_model.state_dict(), resumed.ema_model.state_dict())
    assert same_weights(whole.best_state, resumed.best_state)
    assert whole.curve == resumed.curve
    assert len(whole.curve) == 2 and whole.metrics.steps == 4


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_params, small_sets, generated, tmp_path,
                                                           monkeypatch):
    cfg = robust_cfg(tiny_params, checkpoint_every=1)
    real_loss, calls = losses.adversarial_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(tr, "adversarial_loss", poisoned)
    with pytest.raises(tr.NonFiniteLoss, match="loss is nan at step 2"):
        run(cfg, small_sets, generated, tmp_path)
    assert checkpoint.latest(tmp_path)["step"] == 2
    monkeypatch.setattr(tr, "adversarial_loss", real_loss)
    assert run(cfg, small_sets, generated, tmp_path).metrics.steps == 4


def test_nonfinite_loss_is_caught_at_the_next_check_and_never_saved(tiny_params, small_sets, generated, tmp_path,
                                                                    monkeypatch):
    """Losses are checked together every checkpoint_every steps (and at epoch ends): a NaN at step 2 lets
    step 3 run, then the check at step 4 stops the run naming step 2, and the step-2 checkpoint stays."""
    cfg = robust_cfg(tiny_params, checkpoint_every=2, epochs=1, epoch_size=32)     # 4 steps, checks at 2 and 4
    real_loss, calls = losses.adversarial_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(tr, "adversarial_loss", poisoned)
    with pytest.raises(tr.NonFiniteLoss, match="loss is (inf|nan) at step 2 "):
        run(cfg, small_sets, generated, tmp_path)
    assert calls["n"] == 4
    kept = checkpoint.latest(tmp_path)
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())


@pytest.mark.parametrize("aux_bn", ["none", "source"])
def test_a_training_step_reads_nothing_back_to_the_host(tiny_params, small_sets, generated, tmp_path, monkeypatch,
                                                        aux_bn):
    """No .item(), float(), int(), bool(), .tolist(), .cpu() or .numpy() of a tensor inside train_step (each
    is a GPU synchronisation on CUDA), also with real and generated rows through their own batch norms;
    the run still reports its losses, read at the checks."""
    real_step = tr.train_step
    inside = {"now": False, "steps": 0}

    def guarded(name):
        real = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if inside["now"]:
                raise AssertionError(f"Tensor.{name} inside train_step")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, method)

    for name in ("item", "__float__", "__int__", "__index__", "__bool__", "tolist", "cpu", "numpy"):
        guarded(name)

    def step(*args, **kwargs):
        inside["now"] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside["now"] = False
            inside["steps"] += 1

    monkeypatch.setattr(tr, "train_step", step)
    result = run(robust_cfg(tiny_params, checkpoint_every=100, aux_bn=aux_bn), small_sets, generated, tmp_path)
    assert inside["steps"] == 4 and np.isfinite([row["train_loss"] for row in result.curve]).all()


@pytest.mark.slow
def test_compile_matches_eager_and_resumes(tiny_params, small_sets, generated, tmp_path):
    """train_robust.compile (inductor on the CPU here) gives the eager run's curve and weights within
    1e-4 (kernel fusion reorders float sums; measured differences about 1e-6), checkpoints the plain
    module (no `_orig_mod.` keys), and a compiled run stopped mid-epoch resumes to the uninterrupted
    compiled run's weights exactly."""
    eager = run(robust_cfg(tiny_params, checkpoint_every=2), small_sets, generated, tmp_path / "eager")
    cfg = robust_cfg(tiny_params, checkpoint_every=2, compile=True)
    whole = run(cfg, small_sets, generated, tmp_path / "whole")
    for a, b in zip(eager.curve, whole.curve, strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "train_ce", "train_kl", "train_acc", "val_clean_acc", "val_robust_acc"):
            assert abs(a[key] - b[key]) <= 1e-4, (key, a[key], b[key])
    ours, theirs = eager.ema_model.state_dict(), whole.ema_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours) <= 1e-4
    with pytest.raises(tr.Preempted):
        run(cfg, small_sets, generated, tmp_path / "cut", stop_after=3)
    saved = checkpoint.latest(tmp_path / "cut")
    assert not [k for k in saved["model"] if "_orig_mod" in k]
    resumed = run(cfg, small_sets, generated, tmp_path / "cut")
    assert same_weights(whole.ema_model.state_dict(), resumed.ema_model.state_dict())
    assert whole.curve == resumed.curve


def test_sigterm_checkpoints_then_exits_nonzero(tiny_params, small_sets, generated, tmp_path, monkeypatch):
    cfg = robust_cfg(tiny_params, checkpoint_every=100)
    real_loss, calls = losses.adversarial_loss, {"n": 0}

    def preempting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)           # arrives mid-step, like a scheduler's notice
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(tr, "adversarial_loss", preempting)
    with pytest.raises(tr.Preempted) as stopped:
        run(cfg, small_sets, generated, tmp_path)
    assert stopped.value.code != 0
    assert checkpoint.latest(tmp_path)["step"] == 2                # the step in flight finished first
    assert signal.getsignal(signal.SIGTERM) is not None


def cli_args(params: Path, small_sets, out: Path, name: str, generated=None) -> list[str]:
    args = ["--params", str(params), "--run", name, "--train", str(small_sets["train"]),
            "--val", str(small_sets["val"]), "--workdir", str(out / "work"),
            "--out-model", str(out / "model.pt"), "--out-best", str(out / "best.pt"),
            "--out-metrics", str(out / "metrics.json"), "--out-curve", str(out / "curve.csv")]
    if generated:
        args += ["--generated", *map(str, sorted(generated[0].glob("*.h5"))), "--labels", str(generated[1])]
    return args


def test_cli_baseline_and_generator_runs(tiny_params, write_params, small_sets, generated, tmp_path):
    cfg = dict(tiny_params)
    cfg["train_robust"] = {**cfg["train_robust"], **TINY_ROBUST}
    params = write_params(cfg)
    metrics = {}
    for name in ("baseline", "gaussian"):
        out = tmp_path / name
        tr.main(cli_args(params, small_sets, out, name, generated if name != "baseline" else None)
                + ["--out-figure", str(out / "curve.png")])
        metrics[name] = json.loads((out / "metrics.json").read_text())
        assert (out / "curve.png").stat().st_size > 0
        lines = (out / "curve.csv").read_text().splitlines()
        assert lines[0].split(",") == tr.CURVE_FIELDS and len(lines) == 3
        model = models.load_checkpoint(out / "model.pt", expected="small_cnn")
        assert not model.training
        best = torch.load(out / "best.pt", weights_only=False)
        assert best["val_robust_acc"] == metrics[name]["val_robust_acc_best"]
        assert 0 <= metrics[name]["val_robust_acc_best"] <= 1
    assert metrics["baseline"]["steps"] == metrics["gaussian"]["steps"] == 4   # equal training steps
    assert metrics["baseline"]["n_generated"] == 0 and metrics["gaussian"]["n_generated"] == 120
    assert metrics["gaussian"]["generated_per_batch"] == 4
    # Rerunning a finished run resumes at its end: nothing retrained, same weights and metrics.
    before = torch.load(tmp_path / "gaussian" / "model.pt", weights_only=False)["state_dict"]
    tr.main(cli_args(params, small_sets, tmp_path / "gaussian", "gaussian", generated))
    after = torch.load(tmp_path / "gaussian" / "model.pt", weights_only=False)["state_dict"]
    assert same_weights(before, after)
    again = json.loads((tmp_path / "gaussian" / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if not k.endswith("sha256")} == \
        {k: v for k, v in metrics["gaussian"].items() if not k.endswith("sha256")}


def test_baseline_refuses_generated_and_generator_needs_it(tiny_params, small_sets, generated, tmp_path):
    cfg = robust_cfg(tiny_params)
    with pytest.raises(ValueError, match="real data only"):
        tr.train_robust(cfg, 0, "cpu", "baseline", small_sets["train"], small_sets["val"], [generated[0]],
                        [generated[1]], tmp_path, progress=False, entry=P.Run("baseline", None, None, None, 0))
    with pytest.raises(ValueError, match="needs --generated"):
        tr.train_robust(cfg, 0, "cpu", "gaussian", small_sets["train"], small_sets["val"], [], [],
                        tmp_path, progress=False, entry=P.Run("gaussian", "gaussian", None, None, 0))


@pytest.mark.parametrize("option", ["sync_bn", "compile"])
def test_unmeasured_multi_gpu_options_are_refused_before_any_work(tiny_params, small_sets, generated, tmp_path,
                                                                   monkeypatch, option):
    """Under torchrun (WORLD_SIZE 2), sync_bn (global-batch statistics in the attack, unlike the references)
    and compile (compiled DDP has never run) stop with one line naming the key, before joining the group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=f"train_robust.{option}: true under torchrun"):
        run(robust_cfg(tiny_params, **{option: True}), small_sets, generated, tmp_path)
    assert not any(tmp_path.iterdir())


def test_cuda_runs_pick_the_fastest_convolution_kernels(tiny_params, small_sets, generated, tmp_path, monkeypatch):
    """train_robust sets cudnn.benchmark on CUDA (fixed shapes), as the diffusion loop does: the CPU run
    takes the device path through a stand-in for init_distributed that reports a CUDA device."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = {}

    def init(device_name):
        seen["benchmark_before"] = torch.backends.cudnn.benchmark
        return tr.Dist(), torch.device("cuda")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        seen["benchmark"] = torch.backends.cudnn.benchmark
        raise Stop

    monkeypatch.setattr(tr, "init_distributed", init)
    monkeypatch.setattr(tr, "load_threat", stop)
    with pytest.raises(Stop):
        run(robust_cfg(tiny_params), small_sets, generated, tmp_path)
    assert seen == {"benchmark_before": False, "benchmark": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes(tiny_params, write_params, small_sets, generated, tmp_path):
    cfg = dict(tiny_params)
    cfg["train_robust"] = {**cfg["train_robust"], **TINY_ROBUST}
    params = write_params(cfg)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "pipeline.train_robust", "--",  # "--": torchrun would take --run
           *cli_args(params, small_sets, out, "gaussian", generated)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    models.load_checkpoint(out / "model.pt", expected="small_cnn")


def test_a_rerun_with_other_settings_starts_afresh(tiny_params, small_sets, generated, tmp_path):
    """A job rerun because its params changed must not resume (or return) the finished old run."""
    run(robust_cfg(tiny_params), small_sets, generated, tmp_path / "work")
    changed = robust_cfg(tiny_params, beta=1.0)
    rerun = run(changed, small_sets, generated, tmp_path / "work")
    fresh = run(changed, small_sets, generated, tmp_path / "fresh")
    assert same_weights(rerun.ema_model.state_dict(), fresh.ema_model.state_dict())
    assert len(list((tmp_path / "work").glob("superseded-*/step-*.pt"))) >= 1   # the old run is kept aside
    # other inputs (another generated set: one shard fewer) count as another setting too
    again = tr.train_robust(changed, 0, "cpu", "gaussian", small_sets["train"], small_sets["val"],
                            [generated[0] / "shard-00000.h5"], [generated[1] / "shard-00000.h5"],
                            tmp_path / "work", progress=False)
    assert not same_weights(again.ema_model.state_dict(), fresh.ema_model.state_dict())


def test_step_count_and_warm_up_are_the_references(tiny_params):
    """epochs * epoch_size // batch_size steps (DeepMind's steps_from_epochs), not
    epochs * (epoch_size // batch_size): 19,531 steps and 488 warm-up steps at paper scale."""
    paper = robust_cfg(tiny_params, epochs=400, epoch_size=50_000, batch_size=1024, warmup_epochs=10)
    assert paper.total_steps == 19_531 and paper.warmup_steps == 488
    assert [paper.epoch_end(e) for e in (1, 2, 3)] == [48, 97, 146]


def test_epochs_end_where_their_samples_do(tiny_params, small_sets, generated, tmp_path):
    """20 samples per epoch at batch 8: epochs end at steps 2 and 5 (40 // 8), one row each."""
    result = run(robust_cfg(tiny_params, epoch_size=20), small_sets, generated, tmp_path)
    assert result.metrics.steps == 5 and [row["step"] for row in result.curve] == [2, 5]


def test_robust_model_uses_the_references_batchnorm_momentum(tiny_params):
    cfg = robust_cfg(tiny_params)
    assert cfg.bn_momentum == 0.01 and cfg.attack_bn == "batch" and cfg.attack_start == "uniform"
    assert cfg.ema_buffers == "copy"
    model = models.build("wrn-16-4", bn_momentum=cfg.bn_momentum)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.01 for m in norms)


def test_validation_batches_and_splits_over_ranks(tiny_params, monkeypatch):
    """Validation attacks in batches of val_batch_size, and rank r attacks only its share."""
    sizes = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            sizes.append(len(x))
            return torch.zeros(len(x), 10) + x.flatten(1)[:, :10]

    cfg = robust_cfg(tiny_params, val_batch_size=4, val_pgd_steps=1)
    x, y = torch.rand(10, 3, 32, 32), torch.randint(0, 10, (10,))
    tr.validate(Spy(), (x, y), cfg, 0)
    assert max(sizes) == 4
    shares = [tr.rank_share(10, tr.Dist(rank, 3, rank)) for rank in range(3)]
    assert sorted(i for share in shares for i in range(10)[share]) == list(range(10))


@pytest.mark.slow
def test_ddp_resume_counts_every_rank_once(tiny_params, write_params, small_sets, generated, tmp_path):
    """Two gloo ranks stopped mid-epoch and resumed give the uninterrupted run's curve: the epoch's
    partial sums of both ranks are saved once and restored once."""
    cfg = dict(tiny_params)
    cfg["train_robust"] = {**cfg["train_robust"], **TINY_ROBUST, "checkpoint_every": 100}
    params = write_params(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "pipeline.train_robust", "--",
               *cli_args(params, small_sets, out, "gaussian", generated), *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)

    whole = torchrun(tmp_path / "whole")
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-5000:]
    cut = torchrun(tmp_path / "cut", "--stop-after", "3")        # epoch 2 is half done
    assert cut.returncode != 0 and checkpoint.latest(tmp_path / "cut" / "work")["step"] == 3
    resumed = torchrun(tmp_path / "cut")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    assert (tmp_path / "cut" / "curve.csv").read_text() == (tmp_path / "whole" / "curve.csv").read_text()


def test_the_select_index_class_balances_the_generated_draws(tiny_params, small_sets, tmp_path):
    """With select.class_balance (the paper's filter), one epoch's generated images are balanced by
    pseudo-label within sampling noise; without the index, a skewed generator's skew reaches training."""
    from pipeline import select
    from pipeline.shards import read_attrs, write_arrays

    gen, labels_dir = make_generated(tmp_path, n_shards=4, per_shard=100)
    rng = np.random.default_rng(1)
    for shard in sorted(gen.glob("shard-*.h5")):   # a generator that draws class 0 half of the time
        skewed = np.where(rng.random(100) < 0.5, 0, rng.integers(1, 10, 100)).astype(np.int64)
        write_arrays(labels_dir / shard.name, {"label": skewed, "confidence": rng.random(100).astype(np.float32)},
                     {"shard": shard.name, "shard_sha256": read_attrs(shard)["sha256"]})
    index, stats = select.select_dir(select.SelectConfig(class_balance=True, top_fraction=1.0), labels_dir)
    assert len(set(stats["per_class_after"])) == 1
    selection = tmp_path / "index.npy"
    np.save(selection, index)
    cfg = robust_cfg(tiny_params, batch_size=64, generated_fraction=0.5, epoch_size=1024)

    def epoch_counts(chosen):
        dataset = tr.make_dataset(cfg, 0, small_sets["train"], [gen], [labels_dir], chosen, tr.Dist())
        drawn = [y[g] for step in range(cfg.epoch_end(1)) for _, y, g in [dataset[step]]]
        return np.bincount(torch.cat(drawn).numpy(), minlength=10)

    balanced, skewed = epoch_counts(selection), epoch_counts(None)
    n = balanced.sum()
    assert n == 512
    # each class ~ Binomial(512, 1/10): within 4 standard deviations (about 27) of 51.2
    assert np.abs(balanced - n / 10).max() < 4 * np.sqrt(n * 0.1 * 0.9), balanced
    assert skewed[0] > n / 3, skewed


def test_amount_draws_on_nested_subsets_of_the_selection(tiny_params, small_sets, generated, tmp_path):
    """A data amount keeps that many selected images, the same ones whatever the training seed, and a
    smaller amount's images are among a larger one's."""
    from pipeline import loader

    cfg = robust_cfg(tiny_params)
    selection = np.stack([np.repeat(np.arange(3), 40), np.tile(np.arange(40), 3)], 1)
    kept = {amount: loader.subsample(selection, amount, seed=5) for amount in (10, 30, 120)}
    as_set = {amount: {tuple(row) for row in rows} for amount, rows in kept.items()}
    assert [len(rows) for rows in kept.values()] == [10, 30, 120]
    assert as_set[10] < as_set[30] < as_set[120] == {tuple(row) for row in selection}
    assert (np.lexsort(kept[30].T[::-1]) == np.arange(30)).all()      # sorted by shard, then row
    with pytest.raises(ValueError, match="121 images asked for, but the selection holds 120"):
        loader.subsample(selection, 121, seed=5)
    index = tmp_path / "index.npy"
    np.save(index, selection)
    drawn = [tr.make_dataset(cfg, seed, small_sets["train"], [generated[0]], [generated[1]], index, tr.Dist(),
                             amount=30, shard_seed=3).generated for seed in (0, 1)]
    assert len(drawn[0]) == 30 and np.array_equal(drawn[0].selection, drawn[1].selection)   # the same images


def first_conv_calls(model: torch.nn.Module, calls: list[tuple[torch.dtype, bool, bool]]):
    """Record (output dtype, input channels-last, weight channels-last) of every call of the first conv."""
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    cl = torch.channels_last
    return conv.register_forward_hook(lambda mod, args, out: calls.append(
        (out.dtype, args[0].is_contiguous(memory_format=cl) and not args[0].is_contiguous(),
         mod.weight.is_contiguous(memory_format=cl) and not mod.weight.is_contiguous())))


@pytest.mark.parametrize("overrides, expected", [
    ({}, (torch.float32, False, False)),                                   # auto on the CPU: fp32, contiguous
    ({"autocast": "bf16", "memory_format": "channels_last"}, (torch.bfloat16, True, True)),
    ({"autocast": "bf16"}, (torch.bfloat16, False, False)),
    ({"memory_format": "channels_last"}, (torch.float32, True, True)),
])
def test_autocast_and_memory_format_reach_every_training_forward(tiny_params, small_sets, generated, tmp_path,
                                                                  monkeypatch, overrides, expected):
    """train_robust.autocast / memory_format set the dtype of the attack's and the training forwards and the
    layout of the model and its inputs; the params default (auto) is fp32 contiguous on the CPU."""
    calls: list[tuple[torch.dtype, bool, bool]] = []
    real_build = tr.build_state

    def build_state(*args, **kwargs):
        state = real_build(*args, **kwargs)
        first_conv_calls(state.model, calls)
        return state

    monkeypatch.setattr(tr, "build_state", build_state)
    cfg = robust_cfg(tiny_params, checkpoint_every=1, **overrides)
    with pytest.raises(tr.Preempted):
        run(cfg, small_sets, generated, tmp_path, stop_after=1)
    assert len(calls) == 1 + cfg.attack_steps + 2   # TRADES: the clean target, the attack, clean and adversarial views
    assert set(calls) == {expected}


def test_precision_defaults_are_bf16_channels_last_on_cuda_and_fp32_contiguous_on_cpu(tiny_params):
    import yaml

    for path in (REPO / "params.yaml", REPO / "configs" / "default.yaml"):
        section = yaml.safe_load(path.read_text())["train_robust"]
        assert (section["autocast"], section["memory_format"]) == ("auto", "auto"), path
    cfg = robust_cfg(tiny_params)
    memory_format, autocast = tr.precision(cfg, torch.device("cpu"))
    assert memory_format == torch.contiguous_format and not isinstance(autocast, torch.autocast)
    with pytest.warns(UserWarning, match="CUDA") if not torch.cuda.is_available() else contextlib.nullcontext():
        memory_format, autocast = tr.precision(cfg, torch.device("cuda"))
    assert memory_format == torch.channels_last and isinstance(autocast, torch.autocast)
    assert (autocast.device, autocast.fast_dtype) == ("cuda", torch.bfloat16)
    memory_format, autocast = tr.precision(robust_cfg(tiny_params, autocast="fp32", memory_format="contiguous"),
                                           torch.device("cuda"))
    assert memory_format == torch.contiguous_format and not isinstance(autocast, torch.autocast)
