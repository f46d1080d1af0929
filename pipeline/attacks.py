"""The one PGD implementation (Linf and L2), used by robust training, validation and evaluation.

Attacks work in [0, 1] pixel space (models normalise inside). Randomness comes from an explicit
torch.Generator where reproducibility matters. `eval_mode` and `batch_stats_mode` restore the model's
previous state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Threat = Literal["linf", "l2"]
# Batch-norm statistics an attack inside training sees: `batch` = the attacked batch's own statistics,
# running statistics left untouched (the references); `running` = eval mode (the running statistics).
BnMode = Literal["batch", "running"]
BN_MODES: tuple[BnMode, ...] = get_args(BnMode)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch to eval mode for the block (e.g. inside an attack), then restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def batch_stats_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode with every batch norm normalising by the batch's statistics but not updating its
    running statistics, for the block.

    This is how the references attack during training: DeepMind's JAX code calls the model with
    `is_training=False, test_local_stats=True` (adversarial_robustness/jax/experiment.py L264-L266),
    the PyTorch port with `model.train()` and `track_bn_stats(model, False)`
    (gowal21uncovering/utils/trades.py L29-L30; core/utils/utils.py L33-L39).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, tracked = model.training, [m.track_running_stats for m in norms]
    model.train()
    for norm in norms:
        norm.track_running_stats = False  # train mode + not tracking: batch statistics, no update
    try:
        yield model
    finally:
        for norm, track in zip(norms, tracked):
            norm.track_running_stats = track
        model.train(was_training)


def attack_mode(model: nn.Module, bn: BnMode) -> contextlib.AbstractContextManager[nn.Module]:
    """The model state an attack inside training runs in (BnMode)."""
    if bn not in BN_MODES:
        raise ValueError(f"unknown batch-norm mode {bn!r}; known: {', '.join(BN_MODES)}")
    return batch_stats_mode(model) if bn == "batch" else eval_mode(model)


def _l2_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


def project(delta: torch.Tensor, threat: Threat, eps: float) -> torch.Tensor:
    if threat == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _l2_norm(delta)).clamp(max=1.0)


def random_start(x: torch.Tensor, threat: Threat, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator, device=x.device) if generator is not None \
        else torch.rand_like(x)
    if threat == "linf":
        return (noise * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device) if generator is not None \
        else torch.randn_like(x)
    radius = noise.flatten(1)[:, :1].view(-1, *([1] * (x.ndim - 1)))  # uniform radius in [0, eps]
    return direction / _l2_norm(direction) * radius * eps


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    threat: Threat,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise `loss_fn(model(x_adv))` (a per-batch scalar) within the eps-ball around x, in [0, 1].

    `start` overrides the random start (TRADES starts from x + 0.001 * N(0, 1)).
    """
    delta = (start - x) if start is not None else random_start(x, threat, eps, generator)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta))
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if threat == "linf":
                delta = delta + step_size * grad.sign()
            else:
                delta = delta + step_size * grad / _l2_norm(grad)
            delta = project(delta, threat, eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, eps: float,
           step_size: float, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy, run in eval mode (the standard PGD-k evaluation)."""
    with eval_mode(model):
        return pgd(model, x, lambda logits: F.cross_entropy(logits, y, reduction="sum"),
                   threat, eps, step_size, steps, generator)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, eps: float,
                    steps: int, batch_size: int, seed: int = 0) -> tuple[float, torch.Tensor]:
    """PGD-`steps` accuracy (step 2.5 * eps / steps, as in Madry et al.) and the per-example mask."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    correct = []
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            x_adv = pgd_ce(model, xb, yb, threat, eps, 2.5 * eps / steps, steps, generator)
            with torch.no_grad():
                correct.append(model(x_adv).argmax(1) == yb)
    mask = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return float(mask.float().mean()) if len(mask) else 0.0, mask
