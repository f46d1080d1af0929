"""Contract tests over the model registry and the shared PGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import attacks, models

SMALL = ["small_cnn", "wrn-16-4", "preact_resnet18", "dm_preact_resnet18"]


@pytest.mark.parametrize("name", SMALL)
def test_every_model_classifies_and_trains(name):
    torch.manual_seed(0)
    model = models.build(name)
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.features(x).shape[0] == 2


def test_paper_wide_resnets_have_the_published_size():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert 36.0e6 < count(models.build("wrn-28-10")) < 36.7e6  # WRN-28-10: 36.5M parameters


def test_checkpoint_names_its_architecture(tmp_path):
    model = models.build("small_cnn")
    models.save_checkpoint(tmp_path / "m.pt", model, "small_cnn", 10)
    loaded = models.load_checkpoint(tmp_path / "m.pt", expected="small_cnn")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"m\.pt: holds a small_cnn model, expected wrn-16-4"):
        models.load_checkpoint(tmp_path / "m.pt", expected="wrn-16-4")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        models.load_checkpoint(tmp_path / "bad.pt")


def test_a_wide_resnet_saved_with_the_old_padding_is_refused(tmp_path):
    """Same weight shapes, another function: a WRN file without the SAME-padding stamp is not loaded."""
    model = models.build("wrn-16-4")
    models.save_checkpoint(tmp_path / "new.pt", model, "wrn-16-4", 10)
    models.load_checkpoint(tmp_path / "new.pt", expected="wrn-16-4")
    torch.save({"model": "wrn-16-4", "num_classes": 10, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt: a wrn-16-4 saved before WideResNets padded stride-2"):
        models.load_checkpoint(tmp_path / "old.pt", expected="wrn-16-4")


@pytest.mark.parametrize("threat,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_and_raises_the_loss(threat, eps):
    torch.manual_seed(0)
    model = models.build("small_cnn").eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    generator = torch.Generator().manual_seed(0)
    x_adv = attacks.pgd_ce(model, x, y, threat, eps, eps / 4, 10, generator)
    delta = (x_adv - x).flatten(1)
    norms = delta.abs().max(1).values if threat == "linf" else delta.norm(dim=1)
    assert (norms <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_eval_mode_restores_training_mode():
    model = models.build("small_cnn").train()
    with attacks.eval_mode(model):
        assert not model.training
    assert model.training
