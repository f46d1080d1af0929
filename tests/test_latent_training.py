"""Adversarial training inside a learned perturbation set (train_robust.threat: cvae, Wong and Kolter,
2021): the threat-model files that carry the dependency, the latent attack, training and its resume,
and the params rules. Known answers, on the CPU, at tiny scale."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline import checkpoint, latent_attack, models
from pipeline import params as P
from pipeline import threat_model as tm
from pipeline import train_robust as tr
from pipeline.generators import cvae
from tests.helpers import cvae_cfg, robust_cfg, same_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def generators_dir(tmp_path_factory, small_train):
    """models/generators/cvae/model.pt of a briefly trained CVAE (radius and errors estimated)."""
    root = tmp_path_factory.mktemp("generators")
    params = P.validate(P.preset("default"))
    cfg = cvae_cfg(params, train_steps=20, checkpoint_every=20, holdout=16, batch_size=32, latent_steps=2)
    cvae.train(cfg, small_train, root / "work", root / "cvae" / "model.pt", 0, CPU)
    return root


def latent_params(names=("latent_at",), generators=("gaussian", "cvae")) -> dict:
    cfg = P.preset("default")
    cfg["generate"]["generators"] = list(generators)
    cfg["variants"]["names"] = list(names)
    return P.validate(cfg)


def test_threat_model_files_change_only_for_runs_in_the_learned_set(generators_dir, tmp_path):
    cfg = latent_params()
    out = tmp_path / "threat"
    for run in P.runs(cfg):
        tm.write(tm.describe(cfg, run, generators_dir), out)
    assert json.loads((out / "gaussian.json").read_text()) == {"run": "gaussian", "threat": "linf"}
    latent = json.loads((out / "baseline-latent_at.json").read_text())
    _, state = cvae.load_model(generators_dir / "cvae" / "model.pt")
    assert latent["threat"] == "cvae" and latent["radius"] == pytest.approx(state["radius"])
    assert latent_attack.load(out / "gaussian.json", "linf") is None
    latent_set = latent_attack.load(out / "baseline-latent_at.json", "cvae")
    assert latent_set.radius == pytest.approx(state["radius"]) and latent_set.latent_dim == 32

    with pytest.raises(ValueError, match="describes threat 'linf'"):   # a stale file for this run's threat
        latent_attack.load(out / "gaussian.json", "cvae")
    changed = copy.deepcopy(latent)
    changed["model_sha256"] = "0" * 64                                  # the CVAE was retrained since
    (out / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="changed since"):
        latent_attack.load(out / "changed.json", "cvae")
    with pytest.raises(FileNotFoundError, match="generator model is missing"):
        tm.describe(cfg, "cvae-latent_at", tmp_path / "no-generators")


def test_latent_attack_returns_members_that_raise_the_loss(generators_dir, small_train):
    from pipeline.inference import to_float
    from pipeline.shards import read_imageset

    generator, state = cvae.load_model(generators_dir / "cvae" / "model.pt")
    latent = latent_attack.LatentSet(generator, float(state["radius"]))
    images, labels = read_imageset(small_train)
    x, y = to_float(images[:32]), torch.from_numpy(labels[:32])
    torch.manual_seed(0)
    net = models.build("small_cnn").eval()

    def ce(logits):
        return F.cross_entropy(logits, y, reduction="sum")

    with torch.no_grad():
        centre = generator.at(x, torch.zeros(32, latent.latent_dim)).clamp(0, 1)
    torch.testing.assert_close(latent.attack(net, x, ce, steps=0), centre)      # zero steps: the set's centre
    worst = latent.attack(net, x, ce, steps=10)
    with torch.no_grad():
        assert ce(net(worst)) > ce(net(centre))
    assert worst.min() >= 0 and worst.max() <= 1
    starts = latent.random_start(500, torch.Generator().manual_seed(0), CPU)
    norms = starts.norm(dim=1)
    assert (norms <= latent.radius + 1e-5).all() and norms.max() > 0.9 * latent.radius


@pytest.mark.parametrize("loss", ["trades", "pgd"])
def test_latent_adversarial_training_resumes_exactly(loss, tiny_params, small_sets, generators_dir,
                                                     tmp_path):
    cfg = robust_cfg(tiny_params, threat="cvae", loss=loss, attack_steps=2)
    threat_file = tm.write(tm.describe(latent_params(), "baseline-latent_at", generators_dir), tmp_path)

    def train(workdir, stop_after=None):
        return tr.train_robust(cfg, 0, "cpu", "baseline", small_sets["train"], small_sets["val"], [], [], workdir,
                               stop_after=stop_after, progress=False, threat_file=threat_file)

    whole = train(tmp_path / "whole")
    with pytest.raises(SystemExit):
        train(tmp_path / "split", stop_after=2)
    resumed = train(tmp_path / "split")
    assert same_weights(whole.ema_model.state_dict(), resumed.ema_model.state_dict())
    assert whole.metrics.threat == "cvae" and whole.metrics.eps_255 is None
    assert whole.metrics.latent_radius == pytest.approx(latent_attack.load(threat_file, "cvae").radius)
    assert len(whole.curve) == cfg.epochs and 0 <= whole.curve[-1]["val_robust_acc"] <= 1
    # the step really attacks in the set: training differs from plain (pixel linf) TRADES/PGD-AT
    plain = tr.train_robust(robust_cfg(tiny_params, loss=loss, attack_steps=2), 0, "cpu", "baseline",
                            small_sets["train"], small_sets["val"], [], [], tmp_path / "plain", progress=False)
    assert not same_weights(whole.ema_model.state_dict(), plain.ema_model.state_dict())
    assert checkpoint.latest(tmp_path / "whole")["config"]["threat"] == "cvae"


def test_a_learned_threat_needs_its_file(tiny_params, small_sets, tmp_path):
    cfg = robust_cfg(tiny_params, threat="cvae")
    with pytest.raises(ValueError, match="pass --threat-model"):
        tr.train_robust(cfg, 0, "cpu", "baseline", small_sets["train"], small_sets["val"], [], [], tmp_path,
                        progress=False)


def test_params_name_a_learned_threat_without_its_generator():
    latent_params(names=(), generators=("gaussian",))       # an unlisted latent_at variant needs nothing
    with pytest.raises(P.ParamsError, match=r"variants.settings.latent_at.threat: run 'baseline-latent_at'"):
        latent_params(names=("latent_at",), generators=("gaussian",))
    cfg = P.preset("default")
    cfg["train_robust"]["threat"] = "cvae"
    with pytest.raises(P.ParamsError, match="train_robust.threat: run 'baseline' trains in the learned cvae"):
        P.validate(cfg)
    cfg["generate"]["generators"] = ["cvae"]
    assert P.train_robust_for(P.validate(cfg), "cvae")["threat"] == "cvae"
    cfg["train_robust"]["threat"] = "l1"
    with pytest.raises(P.ParamsError, match="train_robust.threat"):
        P.validate(cfg)


def test_threat_model_cli_writes_every_run(generators_dir, write_params, tmp_path):
    cfg = latent_params()
    params = write_params(cfg)
    tm.main(["--params", str(params), "--run", "all", "--generators-dir", str(generators_dir),
             "--out-dir", str(tmp_path / "threat")])
    assert sorted(p.stem for p in (tmp_path / "threat").glob("*.json")) == sorted(P.runs(cfg))
    with pytest.raises(SystemExit, match="not one of"):
        tm.main(["--params", str(params), "--run", "ddpm", "--generators-dir", str(generators_dir),
                 "--out-dir", str(tmp_path / "threat")])
