"""EMA of weights: warm-up decay formula, averaging of parameters, batch-norm buffers copied or averaged, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.ema import EMA, ema_decay


def test_decay_warm_up_form():
    assert ema_decay(0.995, 0) == pytest.approx(1 / 10)
    assert ema_decay(0.995, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.995, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.995, 10_000) == 0.995   # (1+t)/(10+t) >= 0.995 from t = 1790 on
    assert ema_decay(0.995, 1789) < 0.995 == pytest.approx(ema_decay(0.995, 1790))


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_update_averages_weights_and_treats_buffers_as_configured(buffers):
    """Parameters are always averaged; batch-norm statistics are copied from the trained model (the
    references' default) or averaged like the weights; counters are always copied."""
    torch.manual_seed(0)
    net = _net()
    ema = EMA(net, 0.9, buffers=buffers)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 3))                  # moves BN running stats, counter -> 1
    d = ema.update(net)                             # t = 0: d = min(0.9, 1/10) = 0.1
    assert d == pytest.approx(0.1)
    expected = 0.1 * w0 + 0.9 * net[0].weight.detach()
    assert torch.allclose(ema.model[0].weight, expected, atol=1e-6)
    rm = net[1].running_mean if buffers == "copy" else 0.1 * torch.zeros(2) + 0.9 * net[1].running_mean
    assert torch.allclose(ema.model[1].running_mean, rm, atol=1e-6)
    assert ema.model[1].num_batches_tracked.item() == 1
    w1 = ema.model[0].weight.clone()
    d2 = ema.update(net)                            # t = 1: d = 2/11
    assert d2 == pytest.approx(2 / 11)
    assert torch.allclose(ema.model[0].weight, d2 * w1 + (1 - d2) * net[0].weight, atol=1e-6)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())


def test_default_copies_batchnorm_statistics_like_the_references():
    torch.manual_seed(0)
    net = _net()
    ema = EMA(net, 0.995)
    for _ in range(3):
        net.train()(torch.randn(8, 3) + 5)
        ema.update(net)
    assert torch.equal(ema.model[1].running_mean, net[1].running_mean)
    assert torch.equal(ema.model[1].running_var, net[1].running_var)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    net = _net()
    a = EMA(net, 0.99)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.mul_(1.1)
        a.update(net)
    b = EMA(_net(), 0.5)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        net[0].weight.mul_(0.9)
    a.update(net), b.update(net)
    assert b.updates == 4 and b.decay == 0.99
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
