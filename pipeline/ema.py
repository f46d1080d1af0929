"""Exponential moving average of a model's weights (the model that is validated, saved and evaluated).

Gowal et al. (2021) evaluate an EMA of the weights with decay 0.995 and the warm-up form
`decay_t = min(decay, (1 + t) / (10 + t))` (t = number of updates so far), so the average is not
dominated by the random initial weights early on.

Buffers (batch-norm running statistics), `buffers="copy"` (the default): the averaged weights are used
with the trained model's own statistics, copied at every update. This is what the references do:
DeepMind's JAX code averages the parameters only and evaluates them with the trained model's state
(adversarial_robustness/jax/experiment.py L291-L293, utils.py `ema_update`), and the PyTorch port
copies the batch-norm statistics into the averaged model (gowal21uncovering/utils/watrain.py L115,
L187-L196). `buffers="average"` averages floating-point buffers with the same decay as the weights
instead, so the statistics follow the averaged weights. Integer buffers (num_batches_tracked) are always
copied, since averaging a counter is meaningless.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, cast, get_args

import torch
from torch import nn

BufferMode = Literal["copy", "average"]
BUFFER_MODES: tuple[BufferMode, ...] = get_args(BufferMode)


def ema_decay(decay: float, t: int) -> float:
    """Decay applied at update number `t` (0-based): min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1.0 + t) / (10.0 + t))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel (or the model itself)."""
    # cast: DDP's `module` is the wrapped Module; nn.Module.__getattr__ is typed Tensor | Module
    return cast(nn.Module, model.module) if hasattr(model, "module") else model


class EMA:
    """Holds an averaged copy of a model; `update` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float, shadow: nn.Module | None = None,
                 buffers: BufferMode = "copy") -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay {decay} outside [0, 1)")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ema buffers {buffers!r} not in {BUFFER_MODES}")
        self.decay = decay
        self.buffers = buffers
        self.updates = 0
        # `shadow` lets the caller pass a plain copy (e.g. without SyncBatchNorm) to average into.
        self.model = shadow if shadow is not None else copy.deepcopy(unwrap(model))
        self.model.load_state_dict(unwrap(model).state_dict())
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Average the current weights in; returns the decay used."""
        d = ema_decay(self.decay, self.updates)
        source = unwrap(model).state_dict()
        averaged = {name for name, _ in self.model.named_parameters()}
        for name, value in self.model.state_dict().items():
            new = source[name].detach()
            if value.dtype.is_floating_point and (name in averaged or self.buffers == "average"):
                value.mul_(d).add_(new.to(value.dtype), alpha=1.0 - d)
            else:
                value.copy_(new)
        self.updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.model.load_state_dict(state["model"])
