"""Learned perturbation sets: corruptions, CVAE training (ELBO falls, exact resume), the radius estimate,
the latent ball (projection, PGD, truncated prior) and the `cvae` generator's shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import checkpoint, corruptions, generate, shards
from pipeline import params as P
from pipeline.generators import cvae
from pipeline.inference import to_float
from pipeline.shards import read_imageset
from tests.helpers import cvae_cfg

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", corruptions.KINDS)
def test_each_corruption_changes_the_image_and_is_seeded(kind, cifar_sets):
    images, _ = read_imageset(cifar_sets["test"])
    images = images[:8]
    out, chosen = corruptions.corrupt(images, np.random.default_rng(0), (kind,))
    again, _ = corruptions.corrupt(images, np.random.default_rng(0), (kind,))
    assert out.dtype == np.uint8 and out.shape == images.shape and (chosen == 0).all()
    assert np.array_equal(out, again)
    changed = np.abs(out.astype(int) - images.astype(int)).mean()
    assert 0.5 < changed < 60, changed                    # visibly corrupted, still the same picture


@pytest.mark.slow
def test_elbo_falls_and_a_killed_run_resumes_exactly(tiny_params, small_train, tmp_path, monkeypatch):
    cfg = cvae_cfg(tiny_params, train_steps=40, checkpoint_every=20, holdout=32, batch_size=32, latent_steps=3)
    cvae.train(cfg, small_train, tmp_path / "work-a", tmp_path / "a.pt", 0, CPU)
    a = torch.load(tmp_path / "a.pt", weights_only=False)
    losses = [row["loss"] for row in a["curve"]]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    assert a["radius"] > 0 and a["n_holdout"] == 32
    assert set(a["errors"]) == {"approximation_mse", "sufficient_likelihood_mse", "identity_mse"}
    assert all(np.isfinite(v) for v in a["errors"].values())

    real_save = checkpoint.save

    def save_then_die(workdir, step, state, keep=2):
        path = real_save(workdir, step, state, keep)
        if step == 20:
            raise KeyboardInterrupt("killed after the step-20 checkpoint")
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cvae.train(cfg, small_train, tmp_path / "work-b", tmp_path / "b.pt", 0, CPU)
    monkeypatch.setattr(checkpoint, "save", real_save)
    cvae.train(cfg, small_train, tmp_path / "work-b", tmp_path / "b.pt", 0, CPU)
    b = torch.load(tmp_path / "b.pt", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["radius"] == b["radius"] and a["curve"] == b["curve"]


def test_radius_is_the_largest_standardised_posterior_mean_norm():
    torch.manual_seed(0)
    model = cvae.CVAE(latent_dim=8, width=4).eval()
    x, x_tilde = torch.rand(10, 3, 32, 32), torch.rand(10, 3, 32, 32)
    with torch.no_grad():
        mu_p, logvar_p = model.prior(x)
        mu_q, _ = model.posterior(torch.cat([x, x_tilde], 1))
        by_hand = ((mu_q - mu_p) / torch.exp(0.5 * logvar_p)).norm(dim=1).max().item()
    assert cvae.estimate_radius(model, x, x_tilde) == pytest.approx(by_hand, rel=1e-5)
    assert cvae.estimate_radius(model, x, x_tilde, batch=3) == pytest.approx(by_hand, rel=1e-5)


def test_latent_pgd_stays_inside_the_ball_and_uses_it():
    eps = 1.5
    target = torch.randn(6, 8) * 10                         # far outside the ball
    u = cvae.latent_pgd(lambda v: -(v - target).pow(2).sum(1), 8, 6, eps, 30, CPU)
    norms = u.norm(dim=1)
    assert (norms <= eps + 1e-5).all()
    assert (norms > 0.99 * eps).all()                       # the optimum is on the boundary, towards target
    cosine = torch.nn.functional.cosine_similarity(u, target, dim=1)
    assert (cosine > 0.99).all()


def test_truncated_prior_samples_lie_in_the_ball():
    generators = [torch.Generator().manual_seed(i) for i in range(200)]
    u = cvae.truncated_prior(16, 2.0, generators)
    assert u.shape == (200, 16) and (u.norm(dim=1) <= 2.0 + 1e-5).all()
    again = cvae.truncated_prior(16, 2.0, [torch.Generator().manual_seed(i) for i in range(200)])
    assert torch.equal(u, again)
    # a radius far past the typical norm sqrt(16) = 4 leaves the prior untruncated: norms average about 4
    wide = cvae.truncated_prior(16, 50.0, [torch.Generator().manual_seed(i) for i in range(200)])
    assert 3.5 < wide.norm(dim=1).mean() < 4.5


@pytest.mark.slow
def test_cvae_generator_shards_are_deterministic_and_keep_labels(tiny_params, small_train, tmp_path):
    cfg = cvae_cfg(tiny_params, train_steps=4, checkpoint_every=4, holdout=16, batch_size=16, latent_steps=2)
    model = tmp_path / "model.pt"
    cvae.train(cfg, small_train, tmp_path / "work", model, 0, CPU)
    params = dict(tiny_params)
    params["generate"] = {**params["generate"], "generators": ["cvae"], "n_images": 200, "shard_size": 100}
    params = P.validate(params)
    first, second = tmp_path / "a" / "shard-00001.h5", tmp_path / "b" / "shard-00001.h5"
    generate.run(params, "cvae", model, "1", first, None)
    generate.run(params, "cvae", model, "0", tmp_path / "b" / "shard-00000.h5", None)
    generate.run(params, "cvae", model, "1", second, None)
    assert first.read_bytes() == second.read_bytes()
    images, labels = read_imageset(first, verify=True)
    train_images, train_labels = read_imageset(small_train)
    rows = np.arange(100, 200) % len(train_images)
    assert np.array_equal(labels, train_labels[rows])          # perturbed copies keep their labels
    assert np.abs(images.astype(int) - train_images[rows].astype(int)).mean() < 60
    assert shards.read_attrs(first)["generator"] == "cvae"


@pytest.mark.slow
def test_latent_threat_evaluation_and_its_table_row(tiny_params, write_params, small_train, cifar_sets, tmp_path):
    import json

    from pipeline import evaluate_latent, models
    from pipeline import table as T

    cfg = cvae_cfg(tiny_params, train_steps=30, checkpoint_every=30, holdout=32, batch_size=32, latent_steps=3)
    generator_path = tmp_path / "models" / "generators" / "cvae" / "model.pt"
    cvae.train(cfg, small_train, tmp_path / "work", generator_path, 0, CPU)
    torch.manual_seed(0)
    net = models.build("small_cnn")
    images, labels = read_imageset(small_train)
    x, y = to_float(images), torch.from_numpy(labels)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(len(y)).repeat(4).split(32):     # a little real training: accuracy to lose
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    robust = tmp_path / "models" / "robust" / "baseline" / "model.pt"
    models.save_checkpoint(robust, net.eval(), "small_cnn", 10)
    tiny_params["evaluate"].update(n_eval=64, batch_size=32, pgd_steps=10)
    out = tmp_path / "results" / "evaluate" / "baseline"
    evaluate_latent.main(["--params", str(write_params(tiny_params)), "--run", "baseline", "--model", str(robust),
                          "--cvae", str(generator_path), "--test", str(small_train), "--out", str(out / "cvae.json"),
                          "--out-examples", str(out / "cvae.h5")])
    report = json.loads((out / "cvae.json").read_text())
    generator, state = cvae.load_model(generator_path)
    assert report["threat"] == "cvae" and report["radius"] == pytest.approx(state["radius"])
    # the attack starts at the centre of each set and only climbs the loss: never better than the centre
    with torch.no_grad():
        centre = generator.at(x[:64], torch.zeros(64, generator.latent_dim)).clamp(0, 1)
        centre_acc = (net(centre).argmax(1) == y[:64]).float().mean().item()
    assert report["latent_acc"] <= centre_acc + 1 / 64 and report["latent_acc"] < report["clean_acc"]
    examples = shards.read_arrays(out / "cvae.h5")
    assert examples["latent_correct"].mean() == pytest.approx(report["latent_acc"])

    train_metrics = tmp_path / "results" / "train_robust" / "baseline" / "metrics.json"
    train_metrics.parent.mkdir(parents=True)
    train_metrics.write_text(json.dumps({"run": "baseline", "generator": None, "model": "small_cnn", "epochs": 1,
                                         "cutmix_alpha": 0.0, "model_sha256": report["model_sha256"]}))
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"test_acc": 0.5}))
    (row,) = T.build_rows(P.validate(tiny_params), [out / "cvae.json"], [train_metrics], teacher, [], {}, "abc")
    assert row["threat"] == "cvae" and row["eps"].startswith("latent ") and row["autoattack_acc"] == ""
    assert row["pgd_acc"] == report["latent_acc"] and row["corrupted_acc"] == report["corrupted_acc"]
    assert "| cvae |" in T.markdown([row], "cifar10")
