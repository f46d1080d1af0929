"""Adversarial training losses: TRADES (Zhang et al., 2019) and PGD adversarial training (Madry et al.).

Both take per-example label smoothing, so smoothing can apply to generated (pseudo-labelled) images
only, as in Gowal et al. (2021). The inner maximisation uses the one PGD in pipeline.attacks. By default
it runs as the references do: batch-norm layers normalise by the attacked batch's own statistics and
never update their running statistics (`AttackSpec.bn = "batch"`; `"running"` attacks in eval mode),
and PGD starts from a uniform point of the eps-ball (`AttackSpec.start = "uniform"`; `"gaussian"` starts
from x + 0.001 N(0, I), the original TRADES code). A loss returns tensors and leaves the optimiser alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import BnMode, Threat, attack_mode, pgd, random_start
from pipeline.aux_bn import Route, routed
from pipeline.cutmix import Mix
from pipeline.params import LearnedThreat

if TYPE_CHECKING:
    from pipeline.latent_attack import LatentSet

LossName = Literal["trades", "pgd"]
# What training attacks in: a norm ball, or a learned perturbation set (its latent ball, pipeline/latent_attack.py).
TrainThreat = Threat | LearnedThreat
# Where the inner maximisation starts: uniform in the ball (DeepMind's linf_initialize_fn,
# adversarial_robustness/jax/experiment.py L94; the PyTorch port's TRADES, gowal21uncovering/utils/trades.py
# L33) or x + 0.001 N(0, I) (the original TRADES code, and the port's L2 TRADES, trades.py L48).
StartMode = Literal["uniform", "gaussian"]
START_MODES: tuple[StartMode, ...] = get_args(StartMode)
# Train-mode forward of one or more inputs, returning their logits. Under DDP it is one call of the
# wrapped model (see TwoViews), since DDP expects exactly one forward per backward.
Forward = Callable[..., tuple[torch.Tensor, ...]]


def _views(model: nn.Module, inputs: tuple[torch.Tensor, ...], routes: tuple[Route, ...] | None
           ) -> tuple[torch.Tensor, ...]:
    if routes is None:
        return tuple(model(x) for x in inputs)
    outputs = []
    for x, route in zip(inputs, routes, strict=True):
        with routed(model, route):  # auxiliary batch norm (pipeline/aux_bn.py)
            outputs.append(model(x))
    return tuple(outputs)


class TwoViews(nn.Module):
    """Runs the wrapped model on each input in one forward call (TRADES' clean + adversarial passes).

    Each input goes through the model separately, so batch-norm sees the clean and the adversarial
    batch apart, as in the original TRADES, yet DistributedDataParallel sees one forward. `routes`
    sends each input through main or auxiliary batch norms (pipeline/aux_bn.py).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor, routes: tuple[Route, ...] | None = None) -> tuple[torch.Tensor, ...]:
        return _views(self.model, inputs, routes)


def _plain(model: nn.Module) -> Forward:
    return lambda *inputs, routes=None: _views(model, inputs, routes)


@dataclass(frozen=True)
class AttackSpec:
    """Inner maximisation of the training loss; radii in [0, 1] pixel units. With `latent` (a learned
    perturbation set, threat `cvae`) the search runs in its latent ball instead and eps/step_size are
    unused: the radius is the set's own and the step 2.5 radius / steps. `bn` and `start`: see the
    module docstring (the defaults are the references')."""
    threat: TrainThreat
    eps: float
    step_size: float
    steps: int
    latent: LatentSet | None = None
    bn: BnMode = "batch"
    start: StartMode = "uniform"


def norm_ball(threat: TrainThreat) -> Threat:
    """`threat` where a norm-ball attack runs. Callers take that branch only without a latent set, and a
    learned threat always comes with one (train_robust refuses it otherwise), so this narrows the type the
    annotations cannot tie to `latent`."""
    return cast(Threat, threat)


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor | float = 0.0,
                           reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Cross-entropy against (1 - s) * onehot(y) + s / K, with `s` a scalar or one value per example."""
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    uniform = -logp.mean(dim=1)
    s = torch.as_tensor(smoothing, dtype=logp.dtype, device=logp.device)
    loss = (1.0 - s) * nll + s * uniform
    return loss.mean() if reduction == "mean" else loss


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor | float = 0.0,
                        mix: Mix | None = None) -> torch.Tensor:
    """Mean of lam * CE(y) + (1 - lam) * CE(y_partner) per row (CutMix); plain smoothed CE without a mix."""
    if mix is None:
        return smoothed_cross_entropy(logits, y, smoothing)
    own = smoothed_cross_entropy(logits, y, smoothing, reduction="none")
    other = smoothed_cross_entropy(logits, mix.y_partner, mix.smoothing_partner, reduction="none")
    return (mix.lam * own + (1 - mix.lam) * other).mean()


def trades_kl(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """sum_i KL(p_nat_i || p_adv_i) over the batch (TRADES' KLDivLoss(size_average=False))."""
    logp_nat = F.log_softmax(logits_nat.float(), dim=1)
    logp_adv = F.log_softmax(logits_adv.float(), dim=1)
    return (logp_nat.exp() * (logp_nat - logp_adv)).sum()


def trades_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
                     smoothing: torch.Tensor | float = 0.0, mix: Mix | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRADES outer loss CE(f(x), y) + beta * KL(f(x) || f(x')) / batch; returns (total, ce, kl).
    With CutMix the clean term takes the mixed soft labels; the KL term needs no labels."""
    ce = mixed_cross_entropy(logits_nat, y, smoothing, mix)
    kl = trades_kl(logits_nat, logits_adv) / len(y)
    return ce + beta * kl, ce, kl


def attack_start(x: torch.Tensor, attack: AttackSpec, generator: torch.Generator | None) -> torch.Tensor:
    """The point the inner maximisation starts from (in the latent space for a learned set)."""
    if attack.start not in START_MODES:
        raise ValueError(f"unknown attack start {attack.start!r}; known: {', '.join(START_MODES)}")
    if attack.latent is not None:
        if attack.start == "uniform":
            return attack.latent.random_start(len(x), generator, x.device)
        return 0.001 * torch.randn((len(x), attack.latent.latent_dim), generator=generator, device=x.device)
    if attack.start == "uniform":
        return x + random_start(x, norm_ball(attack.threat), attack.eps, generator)
    return x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def trades_attack(model: nn.Module, x: torch.Tensor, attack: AttackSpec,
                  generator: torch.Generator | None = None, route: Route = None,
                  target: torch.Tensor | None = None) -> torch.Tensor:
    """TRADES inner maximisation: maximise KL(f(x) || f(x')) from `attack_start`, with the batch-norm
    statistics `attack.bn` names (through the batch norms `route` names, when the model has auxiliary
    ones). The clean target f(x) is computed in the same mode, as in the references; `target`
    (probabilities, e.g. CutMix's mixed labels) replaces it."""
    start = attack_start(x, attack, generator)
    with attack_mode(model, attack.bn), routed(model, route):
        if target is not None:
            p_nat = target.float()
        else:
            with torch.no_grad():
                p_nat = F.softmax(model(x).float(), dim=1)

        def kl(logits: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits.float(), dim=1), p_nat, reduction="sum")

        if attack.latent is not None:
            return attack.latent.attack(model, x, kl, attack.steps, start=start)
        return pgd(model, x, kl, norm_ball(attack.threat), attack.eps, attack.step_size, attack.steps, start=start)


def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, beta: float, attack: AttackSpec,
                smoothing: torch.Tensor | float = 0.0, generator: torch.Generator | None = None,
                forward: Forward | None = None, mix: Mix | None = None,
                routes: tuple[Route, Route] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full TRADES step loss (attack on `model`, then train-mode forwards); returns (loss, parts).
    `routes` = (clean, adversarial) batch-norm routes (pipeline/aux_bn.py); the attack uses the second."""
    x_adv = trades_attack(model, x, attack, generator, routes[1] if routes else None,
                          mix.attack_target if mix is not None else None)
    views = forward or _plain(model)
    logits_nat, logits_adv = views(x, x_adv, routes=routes) if routes else views(x, x_adv)
    total, ce, kl = trades_objective(logits_nat, logits_adv, y, beta, smoothing, mix)
    return total, {"ce": ce.detach(), "kl": kl.detach(), "logits": logits_nat.detach()}


def pgd_at_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackSpec,
                smoothing: torch.Tensor | float = 0.0, generator: torch.Generator | None = None,
                forward: Forward | None = None, mix: Mix | None = None,
                routes: tuple[Route, Route] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PGD adversarial training: cross-entropy at the PGD-CE point (start and batch-norm mode from `attack`).
    With CutMix the attack maximises CE of the image's own label, the loss takes the mixed labels."""
    route = routes[1] if routes else None
    start = attack_start(x, attack, generator)
    with attack_mode(model, attack.bn), routed(model, route):
        def summed_ce(logits: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y, reduction="sum")

        if attack.latent is not None:
            x_adv = attack.latent.attack(model, x, summed_ce, attack.steps, start)
        else:
            x_adv = pgd(model, x, summed_ce, norm_ball(attack.threat), attack.eps, attack.step_size, attack.steps,
                        start=start)
    views = forward or _plain(model)
    (logits_adv,) = views(x_adv, routes=(route,)) if routes else views(x_adv)
    ce = mixed_cross_entropy(logits_adv, y, smoothing, mix)
    return ce, {"ce": ce.detach(), "kl": torch.zeros((), device=x.device), "logits": logits_adv.detach()}


def adversarial_loss(name: LossName, model: nn.Module, x: torch.Tensor, y: torch.Tensor, beta: float,
                     attack: AttackSpec, smoothing: torch.Tensor | float = 0.0,
                     generator: torch.Generator | None = None, forward: Forward | None = None,
                     mix: Mix | None = None, routes: tuple[Route, Route] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch on the params name (`trades` or `pgd`); `model` is the plain module the attack uses."""
    if name == "trades":
        return trades_loss(model, x, y, beta, attack, smoothing, generator, forward, mix, routes)
    if name == "pgd":
        return pgd_at_loss(model, x, y, attack, smoothing, generator, forward, mix, routes)
    raise ValueError(f"unknown loss {name!r}; known: trades, pgd")
