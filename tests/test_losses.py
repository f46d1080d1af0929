"""TRADES and PGD-AT losses: hand-computed values, attack geometry, batch-norm left alone by the attack."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline import models
from pipeline.losses import (
    AttackSpec,
    pgd_at_loss,
    smoothed_cross_entropy,
    trades_attack,
    trades_loss,
    trades_objective,
)


def test_trades_objective_matches_hand_computed_case():
    # p_nat = softmax([0, ln 3]) = [1/4, 3/4]; p_adv = softmax([0, 0]) = [1/2, 1/2]; label 1.
    logits_nat = torch.tensor([[0.0, math.log(3.0)]])
    logits_adv = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([1])
    ce = -math.log(0.75)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    total, ce_t, kl_t = trades_objective(logits_nat, logits_adv, y, beta=6.0)
    assert ce_t.item() == pytest.approx(ce, abs=1e-6)
    assert kl_t.item() == pytest.approx(kl, abs=1e-6)
    assert total.item() == pytest.approx(ce + 6.0 * kl, abs=1e-6)   # 1.072544
    # Label smoothing 0.1 over 2 classes: target [0.05, 0.95].
    smoothed, _, _ = trades_objective(logits_nat, logits_adv, y, beta=6.0, smoothing=0.1)
    ce_s = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert smoothed.item() == pytest.approx(ce_s + 6.0 * kl, abs=1e-6)


def test_kl_term_is_averaged_over_the_batch():
    a = torch.tensor([[0.0, math.log(3.0)]])
    b = torch.tensor([[0.0, 0.0]])
    _, _, kl_one = trades_objective(a, b, torch.tensor([1]), 1.0)
    _, _, kl_two = trades_objective(torch.cat([a, a]), torch.cat([b, a]), torch.tensor([1, 1]), 1.0)
    assert kl_two.item() == pytest.approx(kl_one.item() / 2, abs=1e-7)  # second pair has KL 0


def test_smoothing_applies_per_example():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 4])
    s = torch.tensor([0.0, 0.1, 0.0, 0.1])
    per = smoothed_cross_entropy(logits, y, s, reduction="none")
    plain = nn.functional.cross_entropy(logits, y, reduction="none")
    smooth = nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    assert torch.allclose(per, torch.where(s > 0, smooth, plain), atol=1e-6)


class Line(nn.Module):
    """logits = [0, 5 x] for a scalar input: KL(p(x) || p(x')) grows with |x' - x| either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 5.0 * x.flatten(1).sum(1, keepdim=True)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_gaussian_start_trades_attack_moves_to_the_linf_boundary_away_from_its_start():
    x = torch.full((6, 1), 0.5)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    spec = AttackSpec("linf", eps=0.1, step_size=0.05, steps=4, start="gaussian")
    x_adv = trades_attack(Line(), x, spec, generator=g)
    # From x + 0.001 * noise, ascending the KL moves away from x along the noise sign to the boundary.
    assert torch.allclose(x_adv, x + 0.1 * noise.sign(), atol=1e-6)


@pytest.mark.parametrize("threat, eps", [("linf", 0.1), ("l2", 0.3)])
def test_attacks_start_uniformly_in_the_ball_by_default(threat, eps):
    """The references start the training attack at a uniform point of the eps-ball (DeepMind's
    linf_initialize_fn, the PyTorch port's TRADES), not at x + 0.001 N(0, I)."""
    x = torch.full((400, 4), 0.5)
    spec = AttackSpec(threat, eps=eps, step_size=0.01, steps=0)   # no steps: the start itself
    start = trades_attack(Line(), x, spec, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pgd_at_loss_start(x, spec), start)
    delta = start - x
    size = delta.abs().amax(1) if threat == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6 and size.mean() > eps / 4   # spread over the ball, not near x
    if threat == "linf":  # each coordinate uniform in [-eps, eps]: mean 0, variance eps^2 / 3
        assert abs(delta.mean().item()) < 0.01 and delta.var().item() == pytest.approx(eps ** 2 / 3, rel=0.1)


def pgd_at_loss_start(x: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """The start PGD-AT draws from the same generator seed (one start function for both losses)."""
    from pipeline.losses import attack_start
    return attack_start(x, spec, torch.Generator().manual_seed(0)).clamp(0, 1)


class OneNorm(nn.Module):
    """A batch norm, SiLU and a linear map: its output depends on which statistics normalise."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.silu(self.bn(x)))


@pytest.mark.parametrize("loss", ["trades", "pgd"])
def test_the_attack_normalises_by_batch_statistics_without_updating_them(loss):
    """attack_bn batch (the default): the attack sees the batch's own statistics, so the running
    statistics cannot change its result, and they are left untouched; attack_bn running: eval mode."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 2) * 4 - 2, torch.randint(0, 3, (16,))
    results = {}
    for running_mean in (0.0, 1.0):
        torch.manual_seed(1)   # the same weights; only the running statistics differ
        model = OneNorm().train()
        model.bn.running_mean.fill_(running_mean)
        model.bn.running_var.fill_(1.0 - 0.9 * running_mean)
        before = {k: v.clone() for k, v in model.bn.state_dict().items()}
        for bn in ("batch", "running"):
            spec = AttackSpec("linf", 0.3, 0.1, 3, bn=bn)
            g = torch.Generator().manual_seed(1)
            if loss == "trades":
                results[running_mean, bn] = trades_attack(model, x, spec, generator=g)
            else:
                from pipeline.attacks import attack_mode, pgd
                from pipeline.losses import attack_start
                with attack_mode(model, bn):
                    results[running_mean, bn] = pgd(
                        model, x, lambda logits: nn.functional.cross_entropy(logits, y, reduction="sum"),
                        "linf", 0.3, 0.1, 3, start=attack_start(x, spec, g))
            assert model.training
            assert all(torch.equal(before[k], v) for k, v in model.bn.state_dict().items())
    assert torch.equal(results[0.0, "batch"], results[1.0, "batch"])
    assert not torch.equal(results[0.0, "running"], results[1.0, "running"])


@pytest.mark.parametrize("bn", ["batch", "running"])
def test_attack_does_not_update_batchnorm_statistics(bn):
    torch.manual_seed(0)
    model = models.build("small_cnn").train()
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    attack = AttackSpec("linf", 8 / 255, 2 / 255, 3, bn=bn)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    trades_loss(model, x, y, 6.0, attack)
    assert all(bn.num_batches_tracked.item() == 2 for bn in bns)  # clean + adversarial forwards only
    assert model.training and all(bn.track_running_stats for bn in bns)
    pgd_at_loss(model, x, y, attack)
    assert all(bn.num_batches_tracked.item() == 3 for bn in bns)


def test_losses_backpropagate_to_every_parameter_and_pgd_raises_the_loss():
    torch.manual_seed(0)
    model = models.build("small_cnn").train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    attack = AttackSpec("l2", 0.5, 0.2, 3)
    for loss_fn in (lambda: trades_loss(model, x, y, 6.0, attack)[0], lambda: pgd_at_loss(model, x, y, attack)[0]):
        model.zero_grad()
        loss = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        model.eval()
        clean = smoothed_cross_entropy(model(x), y).item()
    adv, _ = pgd_at_loss(model.eval(), x, y, AttackSpec("linf", 8 / 255, 2 / 255, 5))
    assert adv.item() > clean
