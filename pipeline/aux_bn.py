"""Auxiliary batch norm (AdvProp, Xie et al., CVPR 2020) for robust training.

Every BatchNorm2d of a model becomes a `DualBatchNorm2d` holding two complete batch norms (statistics
and affine parameters): `main` and `aux`. A route decides which one each input goes through:

- `train_robust.aux_bn: adversarial` (AdvProp): clean images through main, adversarial examples through
  aux, and the adversary itself attacks the aux-BN network.
- `train_robust.aux_bn: source`: real images through main, generated images through aux, since
  generated images come from another distribution. The loader puts a batch's real rows first, so the
  route is their count, a Python int known on the host: each batch norm takes two slices, with no
  device-to-host synchronisation (a boolean mask needed four per batch-norm call, about 1,200 per
  WRN-28-10 TRADES step) and a static shape torch.compile traces without a graph break.

Only main is used at inference: the route defaults to main, so validation, the saved model and
AutoAttack all see a plain classifier. `main_only(model)` turns the trained network back into the
registry's architecture (the main batch norms in place of the dual ones) for saving.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn

# Which inputs the auxiliary batch norms see (train_robust.aux_bn): none, adversarial (AdvProp) or source
# (the generated rows).
AuxBnMode = Literal["none", "adversarial", "source"]
MODES: tuple[AuxBnMode, ...] = get_args(AuxBnMode)
Route = str | int | None   # "main", "aux", n (the first n rows -> main, the rest -> aux), or None (= main)


class DualBatchNorm2d(nn.Module):
    """Two batch norms with one switch; `route` is set by `routed`, never by the caller directly."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.route: Route = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None or (isinstance(route, str) and route == "main"):
            return self.main(x)
        if isinstance(route, str):
            if route != "aux":
                raise ValueError(f"unknown batch-norm route {route!r}")
            return self.aux(x)
        if isinstance(route, bool) or not 0 <= route <= len(x):
            raise ValueError(f"batch-norm route {route!r}: a count of leading rows between 0 and {len(x)}")
        if route == len(x):
            return self.main(x)
        if route == 0:
            return self.aux(x)
        return torch.cat([self.main(x[:route]), self.aux(x[route:])])


def convert(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in place by a DualBatchNorm2d (aux starts as a copy of main)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, DualBatchNorm2d(child))
        else:
            convert(child)
    return model


def duals(model: nn.Module) -> list[DualBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]


@contextmanager
def routed(model: nn.Module, route: Route) -> Iterator[None]:
    """Send every forward inside the block through `route`; restores the previous routes after."""
    layers = duals(model)
    previous = [layer.route for layer in layers]
    for layer in layers:
        layer.route = route
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.route = old


def main_only(model: nn.Module) -> nn.Module:
    """A copy of `model` with each DualBatchNorm2d replaced by its main batch norm (the inference net)."""
    plain = copy.deepcopy(model)

    def strip(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, DualBatchNorm2d):
                setattr(module, name, child.main)
            else:
                strip(child)

    strip(plain)
    return plain


def routes_for(mode: AuxBnMode, n_real: int) -> tuple[Route, Route] | None:
    """(clean route, adversarial route) of one batch for `train_robust.aux_bn`; None when off. `n_real`:
    the batch's leading real rows (pipeline.loader.MixedBatches.real_rows), the rest being generated."""
    if mode == "none":
        return None
    if mode == "adversarial":
        return "main", "aux"
    if mode == "source":
        return n_real, n_real
    raise ValueError(f"train_robust.aux_bn: unknown {mode!r}; known: {', '.join(MODES)}")
