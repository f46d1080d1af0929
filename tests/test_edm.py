"""EDM (Karras et al. 2022): the preconditioning is Table 1, the schedule is Karras' formula, the Heun
sampler run with the exact denoiser of a known Gaussian mixture reproduces the mixture (and at 2 steps is
the hand-computed trajectory), the loss and its sigma distribution are EDMLoss's, EMA and lr ramp-up are
EDM's, training resumes exactly and stops on divergence with one line, and sampling is per-image seeded
with balanced, stored classes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline import checkpoint, generate, shards
from pipeline import params as params_mod
from pipeline.generators import diffusion_training, edm
from pipeline.preemption import NonFiniteLoss
from tests.helpers import die_after_checkpoint, sample_settings

# --- a Gaussian mixture and its exact denoiser ---

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]])
FACTORS = [np.array([[0.3, 0.0, 0.0], [0.2, 0.2, 0.0], [0.0, 0.1, 0.25]]),
           np.array([[0.2, 0.0, 0.0], [-0.1, 0.35, 0.0], [0.05, 0.0, 0.15]])]
COVS = np.stack([f @ f.T for f in FACTORS])


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[y | y + sigma n = x] for y ~ sum_k w_k N(mu_k, C_k), n ~ N(0, I): the posterior-weighted Wiener
    estimates mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)."""
    x64, s2 = x.double(), float(sigma) ** 2
    logits, estimates = [], []
    for w, mu, cov in zip(WEIGHTS, MEANS, COVS):
        total = torch.from_numpy(cov + s2 * np.eye(3))
        diff = x64 - torch.from_numpy(mu)
        solved = torch.linalg.solve(total, diff.T).T
        logits.append(math.log(w) - 0.5 * (diff * solved).sum(1) - 0.5 * torch.logdet(total))
        estimates.append(torch.from_numpy(mu) + solved @ torch.from_numpy(cov).T)
    post = torch.softmax(torch.stack(logits), 0)
    return (post.unsqueeze(-1) * torch.stack(estimates)).sum(0)


def mixture_moments() -> tuple[np.ndarray, np.ndarray]:
    mean = WEIGHTS @ MEANS
    cov = sum(w * (c + np.outer(m - mean, m - mean)) for w, m, c in zip(WEIGHTS, MEANS, COVS))
    return mean, cov


def test_preconditioning_is_table_1():
    """Table 1, EDM column (training/networks.py:660-663), at hand-computed points, and what it is for:
    unit-variance network input and training target when the data has standard deviation sigma_data."""
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    assert c_skip.tolist() == pytest.approx([0.25 / (s**2 + 0.25) for s in sigma.tolist()], rel=1e-12)
    assert c_out.tolist() == pytest.approx([0.5 * s / math.sqrt(s**2 + 0.25) for s in sigma.tolist()], rel=1e-12)
    assert c_in.tolist() == pytest.approx([1 / math.sqrt(s**2 + 0.25) for s in sigma.tolist()], rel=1e-12)
    assert c_noise.tolist() == pytest.approx([math.log(s) / 4 for s in sigma.tolist()], rel=1e-12)
    assert (c_skip[1].item(), c_out[1].item(), c_in[1].item()) == pytest.approx((0.5, 0.5**1.5, 2**0.5))
    # Var(c_in (y + sigma n)) = 1 and Var((y - c_skip (y + sigma n)) / c_out) = 1 for Var(y) = sigma_data^2
    assert (c_in**2 * (0.25 + sigma**2)).tolist() == pytest.approx([1.0] * 4)
    assert (((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2) / c_out**2).tolist() == pytest.approx([1.0] * 4)


def test_sigma_schedule_is_karras_formula():
    """eq. 5 / generate.py:35-37 for N = 18 (EDM's CIFAR-10 preset), then sigma_N = 0."""
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    expected = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    got = edm.sigma_schedule(n)
    assert got.dtype == torch.float64 and len(got) == n + 1 and got[-1].item() == 0
    assert got[:-1].tolist() == pytest.approx(expected, rel=1e-13)
    assert got[0].item() == pytest.approx(80.0) and got[n - 1].item() == pytest.approx(0.002)
    assert edm.sigma_schedule(2).tolist() == pytest.approx([80.0, 0.002, 0.0])
    with pytest.raises(ValueError, match="at least 2 steps"):
        edm.sigma_schedule(1)


def test_heun_two_steps_is_the_hand_computed_trajectory():
    """N = 2: a Heun step from 80 to 0.002, then the Euler step to 0; three evaluations of D."""
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma))
        return exact_denoiser(x, sigma)

    got = edm.heun_sample(denoise, z, steps=2)
    hi, lo = edm.sigma_schedule(2)[:2].tolist()   # 80 and 0.002 (to the last bit: the 1/7 powers round)
    x0 = z.numpy() * hi

    def d(x, s):
        return exact_denoiser(torch.from_numpy(x), torch.tensor(s, dtype=torch.float64)).numpy()

    d0 = (x0 - d(x0, hi)) / hi
    euler = x0 + (lo - hi) * d0
    d1 = (euler - d(euler, lo)) / lo
    x1 = x0 + (lo - hi) * (0.5 * d0 + 0.5 * d1)
    x2 = x1 + (0.0 - lo) * (x1 - d(x1, lo)) / lo
    assert calls == pytest.approx([80.0, 0.002, 0.002], rel=1e-14)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), x2, rtol=1e-12, atol=0)


def test_heun_with_the_exact_denoiser_reproduces_the_mixture():
    """N(0, 80^2 I) carried to the data distribution, 20,000 samples. At EDM's 18 steps (35 evaluations):
    mean within 0.02, components' shares within 0.02 of 0.3 / 0.7, covariance entries (0.09 to 0.9) within
    0.06: 18 Heun steps overshoot this mixture's largest variance by ~0.04 (4%); at 40 steps that bias is
    below 0.01 and the covariance within 0.015, sampling noise (~0.01) included. 2 steps are far off."""
    z = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, cov = mixture_moments()
    x = edm.heun_sample(exact_denoiser, z, steps=18).numpy()
    assert np.abs(x.mean(0) - mean).max() < 0.02
    assert np.abs(np.cov(x.T) - cov).max() < 0.06
    second = ((x - MEANS[1]) ** 2).sum(1) < ((x - MEANS[0]) ** 2).sum(1)
    assert abs(second.mean() - WEIGHTS[1]) < 0.02
    finer = edm.heun_sample(exact_denoiser, z, steps=40).numpy()
    assert np.abs(finer.mean(0) - mean).max() < 0.02 and np.abs(np.cov(finer.T) - cov).max() < 0.015
    coarse = edm.heun_sample(exact_denoiser, z[:2000], steps=2).numpy()
    assert np.abs(np.cov(coarse.T) - cov).max() > 0.5


def test_loss_weight_and_sigma_distribution_are_edm():
    """ln sigma ~ N(-1.2, 1.2^2) (loss.py:73-74); weight (sigma^2 + 0.25) / (0.5 sigma)^2 = 1 / c_out^2
    (loss.py:75), the squared error summed per image and averaged over images (training_loop.py:132)."""
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 32, 32, 3)  # image i: all i
    labels = torch.arange(50) % 10
    y, classes, sigma, noise = edm.train_step_batch(images, labels, 0, 0, 5000)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.05)   # 3 standard errors
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.04)
    drawn = ((y[:, 0, 0, 0] + 1) * 127.5).round().long()                 # which image each row is
    assert torch.equal(classes, drawn % 10)                               # its own class
    y, classes, sigma, noise = (t[:4] for t in (y, classes, sigma, noise))
    assert y.min() >= -1 and y.max() <= 1 and noise.shape == y.shape
    out = torch.randn_like(y)
    loss = edm.edm_loss(lambda x, s, c: out, y, classes, sigma, noise)
    _, c_out, _, _ = edm.preconditioning(sigma)
    by_hand = sum(((out[i] - y[i]) ** 2).sum() / c_out[i] ** 2 for i in range(4)) / 4
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_ema_half_life_and_lr_ramp_up_are_edm(tiny_params):
    """training_loop.py:136, 143-146 at EDM's settings: batch 512, half-life 500k images, ramp-up 0.05,
    lr ramp-up 10 Mimg = 19531 steps."""
    cfg = dataclasses.replace(tiny_cfg(tiny_params), batch_size=512, ema_halflife_images=500_000,
                              ema_rampup=0.05, lr=1e-3, warmup_steps=19_531)
    assert edm.ema_decay(cfg, 0) == 0.0                               # the first step copies the weights
    assert edm.ema_decay(cfg, 100) == pytest.approx(0.5 ** (512 / (100 * 512 * 0.05)))
    assert edm.ema_decay(cfg, 10**6) == pytest.approx(0.5 ** (512 / 500_000))  # ~0.99929
    assert edm.ema_decay(dataclasses.replace(cfg, ema_rampup=0.0), 0) == pytest.approx(0.5 ** (512 / 500_000))
    assert [edm.learning_rate(cfg, s) for s in (0, 19_531 // 2, 19_531, 10**6)] == \
        pytest.approx([0, 1e-3 * (19_531 // 2) / 19_531, 1e-3, 1e-3])


def test_paper_network_is_sized_like_ddpmpp():
    """configs/paper.yaml's edm network: EDM's cond CIFAR-10 DDPM++ has 55.7 M parameters, ours 59.0 M."""
    cfg = params_mod.section(edm.Config, params_mod.preset("paper")["train_generator"]["edm"])
    unet = edm.build_unet(cfg, 10)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(59.0e6, rel=0.01)
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert unet.config.layers_per_block == 4 and unet.class_embedding.num_embeddings == 10


# --- training and sampling a tiny model ---


def tiny_cfg(tiny_params: dict, **overrides) -> edm.Config:
    return dataclasses.replace(params_mod.section(edm.Config, tiny_params["train_generator"]["edm"]), **overrides)


@pytest.fixture(scope="module")
def edm_model(tmp_path_factory, cifar_sets):
    out = tmp_path_factory.mktemp("edm") / "model.pt"
    cfg = edm.Config(block_out_channels=[16, 32], layers_per_block=1, attention=True, dropout=0.0, lr=1e-3,
                     warmup_steps=1, batch_size=8, train_steps=3, ema_halflife_images=500_000, ema_rampup=0.05,
                     checkpoint_every=3)
    edm.train(cfg, cifar_sets["train"], out.parent / "work", out, 0, torch.device("cpu"))
    return out


def test_resume_equals_uninterrupted(tiny_params, cifar_sets, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_params, train_steps=4, checkpoint_every=2, dropout=0.1, warmup_steps=3)
    device = torch.device("cpu")
    edm.train(cfg, cifar_sets["train"], tmp_path / "work-a", tmp_path / "a.pt", 0, device)
    real_save = checkpoint.save
    die_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        edm.train(cfg, cifar_sets["train"], tmp_path / "work-b", tmp_path / "b.pt", 0, device)
    monkeypatch.setattr(checkpoint, "save", real_save)
    steps_run = []
    real_batch = edm.train_step_batch
    monkeypatch.setattr(edm, "train_step_batch", lambda images, labels, seed, step, *a:
                        steps_run.append(step) or real_batch(images, labels, seed, step, *a))
    edm.train(cfg, cifar_sets["train"], tmp_path / "work-b", tmp_path / "b.pt", 0, device)
    assert steps_run == [2, 3]
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in "ab")
    assert a["kind"] == "edm" and a["num_classes"] == 10 and a["sigma_data"] == 0.5
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    init = edm.build_unet(cfg, 10).state_dict()
    assert any(not torch.equal(init[k], a["state_dict"][k]) for k in init)


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_params, cifar_sets, tmp_path,
                                                                           monkeypatch):
    """A NaN batch at step 3 is noticed at the step-4 sync, before that checkpoint: step 2's is kept."""
    cfg = tiny_cfg(tiny_params, train_steps=6, checkpoint_every=2)
    real_batch = edm.train_step_batch

    def poisoned(images, labels, seed, step, *a):
        y, classes, sigma, noise = real_batch(images, labels, seed, step, *a)
        return (y * float("nan") if step == 3 else y), classes, sigma, noise

    monkeypatch.setattr(edm, "train_step_batch", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"^edm: loss is not finite at step 3; .*train_generator\.edm\.lr"):
        edm.train(cfg, cifar_sets["train"], tmp_path / "work", tmp_path / "m.pt", 0, torch.device("cpu"))
    kept = sorted(p.name for p in (tmp_path / "work").glob("step-*.pt"))
    assert kept == ["step-00000002.pt"] and not (tmp_path / "m.pt").exists()
    state = torch.load(tmp_path / "work" / kept[0], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["unet"].values())


def test_sampler_is_per_image_seeded_with_balanced_stored_classes(edm_model):
    settings = sample_settings(batch_size=4, sampler="ddim", sampling_steps=4, edm_steps=3)
    sampler = edm.load(edm_model, settings, torch.device("cpu"))
    images, labels = sampler.sample(0, 12)
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3) and images.std() > 5
    assert labels.tolist() == [i % 10 for i in range(12)]
    again, again_labels = edm.load(edm_model, settings, torch.device("cpu")).sample(5, 9)  # other range
    assert np.array_equal(again, images[5:9]) and again_labels.tolist() == [5, 6, 7, 8]
    other = edm.load(edm_model, dataclasses.replace(settings, seed=1), torch.device("cpu")).sample(0, 12)[0]
    assert not np.array_equal(other, images)
    assert sampler.provenance() == {"sampler": "heun", "steps": 3, "tile": 4, "sigma_min": 0.002,
                                    "sigma_max": 80.0, "rho": 7.0}


def test_heun_calls_the_network_2n_minus_1_times(edm_model, monkeypatch):
    settings = sample_settings(batch_size=2, sampler="ddim", sampling_steps=4, edm_steps=4)
    sampler = edm.load(edm_model, settings, torch.device("cpu"))
    calls = []
    real = sampler.denoiser.forward
    monkeypatch.setattr(sampler.denoiser, "forward", lambda *a: calls.append(1) or real(*a))
    sampler.sample(0, 2)
    assert len(calls) == 7


def test_generate_writes_identical_shards_with_the_classes(edm_model, tiny_params, tmp_path):
    cfg = params_mod.validate({**tiny_params, "generate": {**tiny_params["generate"], "n_images": 20,
                                                           "shard_size": 10, "batch_size": 4, "edm_steps": 2}})
    together = generate.run(cfg, "edm", edm_model, "all", None, tmp_path / "all")
    alone = [generate.run(cfg, "edm", edm_model, str(i), tmp_path / "one" / f"shard-{i:05d}.h5", None)[0]
             for i in (1, 0)]
    assert [p.read_bytes() for p in together] == [p.read_bytes() for p in sorted(alone)]
    images, labels = shards.read_imageset(together[1])
    assert labels.tolist() == list(range(10)) and len(np.unique(images.reshape(10, -1), axis=0)) == 10
    attrs = shards.read_attrs(together[1])
    assert (attrs["generator"], attrs["sampler"], attrs["steps"], attrs["tile"]) == ("edm", "heun", 2, 4)


def test_unet_config_bytes_do_not_depend_on_the_hash_seed(edm_model):
    state = torch.load(edm_model, weights_only=False)
    defaults = state["unet_config"]["_use_default_values"]
    assert defaults == sorted(defaults)
    assert diffusion_training.unet_config(edm.load_denoiser(state, torch.device("cpu")).unet) == state["unet_config"]
