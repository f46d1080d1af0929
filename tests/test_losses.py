"""TRADES and PGD-AT losses: hand-computed values, attack geometry, batch-norm left alone by the attack."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline import models
from pipeline.losses import (AttackSpec, pgd_at_loss, smoothed_cross_entropy, trades_attack, trades_loss,
                             trades_objective)


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


def test_trades_attack_moves_to_the_linf_boundary_away_from_its_start():
    x = torch.full((6, 1), 0.5)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_adv = trades_attack(Line(), x, AttackSpec("linf", eps=0.1, step_size=0.05, steps=4), generator=g)
    # From x + 0.001 * noise, ascending the KL moves away from x along the noise sign to the boundary.
    assert torch.allclose(x_adv, x + 0.1 * noise.sign(), atol=1e-6)


def test_attack_does_not_update_batchnorm_statistics():
    torch.manual_seed(0)
    model = models.build("small_cnn").train()
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    attack = AttackSpec("linf", 8 / 255, 2 / 255, 3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    trades_loss(model, x, y, 6.0, attack)
    assert all(bn.num_batches_tracked.item() == 2 for bn in bns)  # clean + adversarial forwards only
    assert model.training
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
