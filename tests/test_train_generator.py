"""train_generator: DDPM resume equals an uninterrupted run (across the lr warm-up), the warm-up follows
Ho et al.'s schedule, two data-parallel gloo ranks train the one-rank DDPM and EDM, Gaussian fit recovers
its moments, imported sets are validated with errors that name the file."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import checkpoint, seeding, train_generator
from pipeline import params as params_mod
from pipeline.generators import ddpm, gaussian, imported
from tests.helpers import REPO, die_after_checkpoint


def tiny_ddpm(tiny_params: dict, **overrides) -> ddpm.Config:
    cfg = params_mod.section(ddpm.Config, tiny_params["train_generator"]["ddpm"])
    return dataclasses.replace(cfg, **overrides)


def record_adam_lrs(monkeypatch) -> list[float]:
    """The learning rate of every Adam step taken from now on."""
    lrs: list[float] = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return lrs


def test_ddpm_lr_warms_up_linearly_as_ho_et_al(tiny_params, cifar_sets, tmp_path, monkeypatch):
    """lr * min(step / warmup_steps, 1) with step the steps already taken (hojonathanho/diffusion
    diffusion_tf/utils.py get_warmed_up_lr): 0 at the first step, lr from step warmup_steps on."""
    lrs = record_adam_lrs(monkeypatch)
    cfg = tiny_ddpm(tiny_params, train_steps=6, checkpoint_every=6, warmup_steps=4, lr=2e-4)
    ddpm.train(cfg, cifar_sets["train"], tmp_path / "work", tmp_path / "a.pt", 0, torch.device("cpu"))
    assert lrs == pytest.approx([0.0, 0.5e-4, 1e-4, 1.5e-4, 2e-4, 2e-4], abs=1e-12)
    assert [ddpm.learning_rate(cfg, step) for step in (0, 1, 4, 5000)] == pytest.approx([0, 0.5e-4, 2e-4, 2e-4])

    lrs.clear()  # warmup_steps 0: the constant rate from the first step (training without warm-up)
    flat = dataclasses.replace(cfg, train_steps=2, checkpoint_every=2, warmup_steps=0)
    ddpm.train(flat, cifar_sets["train"], tmp_path / "work-flat", tmp_path / "b.pt", 0, torch.device("cpu"))
    assert lrs == [2e-4, 2e-4]


def test_ddpm_resume_equals_uninterrupted(tiny_params, cifar_sets, tmp_path, monkeypatch):
    # killed at step 2, inside the 3-step warm-up: the resumed run must pick the rates up where they were
    cfg = tiny_ddpm(tiny_params, train_steps=4, checkpoint_every=2, dropout=0.1, warmup_steps=3)
    device = torch.device("cpu")
    lrs = record_adam_lrs(monkeypatch)
    ddpm.train(cfg, cifar_sets["train"], tmp_path / "work-a", tmp_path / "a.pt", 0, device)
    assert lrs == pytest.approx([0, cfg.lr / 3, cfg.lr * 2 / 3, cfg.lr])
    uninterrupted_lrs = list(lrs)
    lrs.clear()

    real_save = checkpoint.save
    die_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        ddpm.train(cfg, cifar_sets["train"], tmp_path / "work-b", tmp_path / "b.pt", 0, device)
    assert not (tmp_path / "b.pt").exists()
    assert lrs == uninterrupted_lrs[:2]
    lrs.clear()
    monkeypatch.setattr(checkpoint, "save", real_save)

    steps_run = []
    real_batch = ddpm.train_step_batch
    monkeypatch.setattr(ddpm, "train_step_batch",
                        lambda images, seed, step, *a: steps_run.append(step) or real_batch(images, seed, step, *a))
    ddpm.train(cfg, cifar_sets["train"], tmp_path / "work-b", tmp_path / "b.pt", 0, device)
    assert steps_run == [2, 3]  # resumed, did not start over
    assert lrs == uninterrupted_lrs[2:]  # the warm-up continues from step 2, not from 0
    a = torch.load(tmp_path / "a.pt", weights_only=False)
    b = torch.load(tmp_path / "b.pt", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    init = ddpm.build_unet(cfg).state_dict()  # and training changed the weights
    assert any(not torch.equal(init[k], a["state_dict"][k]) for k in init)


def test_ddpm_with_other_params_starts_afresh_not_resumed(tiny_params, cifar_sets, tmp_path):
    cfg = tiny_ddpm(tiny_params, train_steps=2, checkpoint_every=2)
    ddpm.train(cfg, cifar_sets["train"], tmp_path / "work", tmp_path / "a.pt", 0, torch.device("cpu"))
    other = dataclasses.replace(cfg, lr=1e-3)
    ddpm.train(other, cifar_sets["train"], tmp_path / "work", tmp_path / "b.pt", 0, torch.device("cpu"))
    ddpm.train(other, cifar_sets["train"], tmp_path / "fresh", tmp_path / "c.pt", 0, torch.device("cpu"))
    assert (tmp_path / "b.pt").read_bytes() == (tmp_path / "c.pt").read_bytes() != (tmp_path / "a.pt").read_bytes()
    assert list((tmp_path / "work").glob("superseded-*/step-00000002.pt"))   # the first run's work is kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddpm", "edm"])
def test_two_gloo_ranks_train_the_one_rank_model(name, tiny_params, write_params, small_sets, tmp_path):
    """torchrun with 2 CPU ranks (gloo), each taking half of every global batch of 8, gives the EMA weights one
    process gets, up to float summation order in the gradient all-reduce (relative 1e-6). Adam divides each
    gradient by its own size, which turns that rounding into whole steps for the few weights whose gradient
    is nearly zero (conv biases before a GroupNorm), so the stated tolerance, after one Adam step at full lr
    (warm-up step 0 has lr 0): the runs differ by less than 1% of how far training moved the weights (L2;
    measured 0.01% DDPM, 0.1% EDM) and fewer than 0.1% of the weights by more than 1e-6 (measured 0.01%,
    0.04%). Dropout 0: dropout masks are per rank."""
    cfg = copy.deepcopy(tiny_params)
    cfg["train_generator"][name].update(batch_size=8, train_steps=2, checkpoint_every=2, dropout=0.0,
                                        warmup_steps=1)
    params = write_params(cfg)

    def args(out):
        return ["--params", str(params), "--generator", name, "--train", str(small_sets["train"]),
                "--workdir", str(out / "work"), "--out", str(out / "model.pt")]

    # both runs on one thread per process: another thread count sums the convolutions in another order
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one_rank = [sys.executable, "-m", "pipeline.train_generator", *args(tmp_path / "one")]
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(_free_port()), "-m", "pipeline.train_generator", "--", *args(tmp_path / "two")]
    for cmd in (one_rank, two_ranks):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    one, two = (torch.load(tmp_path / run / "model.pt", weights_only=False) for run in ("one", "two"))
    saved = torch.load(tmp_path / "two" / "work" / "step-00000002.pt", weights_only=False)
    assert saved["world_size"] == 2 and saved["step"] == 2
    module = train_generator.generators.get(name)
    torch.manual_seed(seeding.derive(0, f"train_generator/{name}/init"))   # the runs' initial weights
    section = params_mod.section(module.Config, cfg["train_generator"][name])
    init = (module.build_unet(section) if name == "ddpm" else module.build_unet(section, 10)).state_dict()
    flat = {run: torch.cat([m["state_dict"][k].flatten() for k in init]) for run, m in (("one", one), ("two", two))}
    start = torch.cat([init[k].flatten() for k in init])
    moved, apart = (flat["one"] - start).norm().item(), (flat["one"] - flat["two"]).norm().item()
    far = ((flat["one"] - flat["two"]).abs() > 1e-6).float().mean().item()
    assert apart < 0.01 * moved and far < 0.001, (moved, apart, far)


def test_ho_unet_has_attention_at_16x16_only():
    cfg = ddpm.Config(block_out_channels=[32, 64, 64], layers_per_block=1, attention=True, dropout=0.1,
                      num_train_timesteps=1000, lr=2e-4, warmup_steps=0, batch_size=2, train_steps=1,
                      ema_decay=0.9999, checkpoint_every=1, pretrained="")
    unet = ddpm.build_unet(cfg)
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    out = unet(torch.randn(2, 3, 32, 32), torch.tensor([3, 900])).sample
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_ema_warmup_formula():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    ddpm.ema_update(ema, model, decay=0.999, step=0)  # rate min(0.999, 1/10) = 0.1
    assert ema.weight.item() == pytest.approx(0.9)
    ddpm.ema_update(ema, model, decay=0.5, step=1000)  # capped at the decay
    assert ema.weight.item() == pytest.approx(0.95)


def test_gaussian_fit_recovers_mean_and_covariance():
    rng = np.random.default_rng(0)
    dim, n = 32 * 32 * 3, 4000
    # two classes from known low-rank-plus-diagonal Gaussians, kept inside [0, 1] (no clipping)
    true_means = [np.full(dim, 0.3), np.full(dim, 0.7)]
    factor = rng.normal(0, 0.02, (dim, 3))
    images, labels = [], []
    for k in range(2):
        x = true_means[k] + rng.normal(0, 1, (n, 3)) @ factor.T + rng.normal(0, 0.01, (n, dim))
        images.append(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))
        labels.append(np.full(n, k))
    images, labels = np.concatenate(images).reshape(-1, 32, 32, 3), np.concatenate(labels)
    means, chols = gaussian.fit(images, labels, ridge=1e-6, num_classes=2)
    true_cov = factor @ factor.T + 0.01**2 * np.eye(dim) + np.eye(dim) / 255**2 / 12  # + quantisation
    for k in range(2):
        assert np.abs(means[k].numpy() - true_means[k]).max() < 0.003
        cov = (chols[k] @ chols[k].T).numpy()
        assert np.abs(cov - true_cov).max() < 0.2 * np.abs(true_cov).max()
        assert np.corrcoef(cov[np.triu_indices(dim, 1)][::97], true_cov[np.triu_indices(dim, 1)][::97])[0, 1] > 0.95


def test_import_manifest_and_errors_name_the_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(20) % 10
    good = tmp_path / "good.npz"
    np.savez(good, image=images, label=labels)
    out = tmp_path / "model.pt"
    imported.train(imported.Config(str(good)), None, tmp_path / "work", out, 0, torch.device("cpu"))
    manifest = torch.load(out, weights_only=False)
    assert manifest["n"] == 20 and manifest["format"] == "npz" and len(manifest["files"][str(good)]["sha256"]) == 64

    bad_dtype = tmp_path / "floats.npz"
    np.savez(bad_dtype, image=images.astype(np.float32), label=labels)
    no_label = tmp_path / "nolabel.npz"
    np.savez(no_label, image=images)
    bad_range = tmp_path / "range.npz"
    np.savez(bad_range, image=images, label=labels + 5)
    lonely = tmp_path / "lonely.npy"
    np.save(lonely, images)
    for path, match in [(bad_dtype, "uint8"), (no_label, "label"), (bad_range, "0..9"),
                        (lonely, "lonely_label.npy"), (tmp_path / "absent.npz", "not found")]:
        with pytest.raises(imported.SourceError, match=path.name.replace(".", r"\.")) as info:
            imported.train(imported.Config(str(path)), None, tmp_path / "w", tmp_path / "m.pt", 0, "cpu")
        assert match in str(info.value)
    assert not (tmp_path / "m.pt").exists()


def test_cli_writes_gaussian_model(tiny_params, write_params, cifar_sets, tmp_path, monkeypatch):
    # a fast fit: two classes only, by relabelling the training set the CLI reads
    out = tmp_path / "models" / "gaussian" / "model.pt"
    real_fit = gaussian.fit
    monkeypatch.setattr(gaussian, "fit", lambda images, labels, ridge, num_classes:
                        real_fit(images[:400], labels[:400] % 2, ridge, num_classes=2))
    train_generator.main(["--params", str(write_params(tiny_params)), "--generator", "gaussian",
                          "--train", str(cifar_sets["train"]), "--workdir", str(tmp_path / "work"),
                          "--out", str(out)])
    state = torch.load(out, weights_only=False)
    assert state["kind"] == "gaussian" and state["mean"].shape == (2, 3072)
    assert state["chol_packed"].shape == (2, 3072 * 3073 // 2) and state["ridge"] == 0.001

