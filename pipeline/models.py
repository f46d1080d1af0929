"""Classifier registry: every model takes images in [0, 1] and normalises inside, so attacks work in
pixel space. `features(x)` returns the penultimate representation (used by the analysis stage).

WideResNet follows Gowal et al. (2021): pre-activation WRN-d-w with SiLU activations and TensorFlow's
`SAME` padding on its stride-2 convolutions (0 before, 1 after), as DeepMind's model and its PyTorch ports;
`dm_preact_resnet18` is DeepMind's pre-activation ResNet-18 (Rebuffi et al. 2021). Both compute exactly
what RobustBench's DMWideResNet / DMPreActResNet compute (pipeline/robustbench.py maps the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Normalize(nn.Module):
    mean: torch.Tensor   # buffers, declared for the type checker (register_buffer sets them)
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalise -> body (to a feature vector) -> linear head."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn(num_classes: int = 10) -> Classifier:
    """A 4-conv CNN with batch norm: trains in a minute on a CPU, the default's model."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]
    body = nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return Classifier(body, 64, num_classes)


def same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow's `SAME` padding of a 3x3 convolution on an even-sized input: 1 pixel each side at
    stride 1, 0 before and 1 after at stride 2 (DeepMind's model_zoo.py; RobustBench's dm_wide_resnet.py)."""
    return F.pad(x, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


class _PreActBlock(nn.Module):
    """Pre-activation residual block. `same` pads the first convolution as TensorFlow's `SAME` (the
    references' WRN) instead of PyTorch's symmetric 1 pixel; `raw_shortcut` makes the projection a 3x3
    `SAME` convolution of the block's input before activation (DeepMind's PreActResNet) instead of a 1x1
    convolution of the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, activation: Callable[[], nn.Module],
                 dropout: float = 0.0, same: bool = False, raw_shortcut: bool = False) -> None:
        super().__init__()
        self.stride, self.same, self.raw_shortcut = stride, same, raw_shortcut
        self.bn1, self.act1 = nn.BatchNorm2d(cin), activation()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 0 if same else 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), activation()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = ((nn.Conv2d(cin, cout, 3, stride, 0, bias=False) if raw_shortcut
                          else nn.Conv2d(cin, cout, 1, stride, bias=False))
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        elif self.raw_shortcut:
            shortcut = self.shortcut(same_pad(x, self.stride))
        else:
            shortcut = self.shortcut(out)
        out = self.conv1(same_pad(out, self.stride) if self.same else out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


def wide_resnet(depth: int, width: int, num_classes: int = 10,
                activation: Callable[[], nn.Module] = nn.SiLU) -> Classifier:
    """Pre-activation WRN-depth-width (depth = 6n + 4), stride-2 convolutions padded as `SAME`."""
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
    for stage in range(3):
        for i in range(n):
            cin = widths[stage] if i == 0 else widths[stage + 1]
            layers.append(_PreActBlock(cin, widths[stage + 1], (1 if stage == 0 else 2) if i == 0 else 1,
                                       activation, same=True))
    layers += [nn.BatchNorm2d(widths[3]), activation(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), widths[3], num_classes)


def preact_resnet18(num_classes: int = 10) -> Classifier:
    """PreActResNet-18 (ReLU), the usual baseline of robust-training papers."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_PreActBlock(cin, cout, stride, nn.ReLU), _PreActBlock(cout, cout, 1, nn.ReLU)]
        cin = cout
    layers += [nn.BatchNorm2d(512), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), 512, num_classes)


def dm_preact_resnet18(num_classes: int = 10) -> Classifier:
    """DeepMind's PreActResNet-18 with SiLU (Rebuffi et al. 2021; Gowal et al. 2021's R18 models): `SAME`
    padding and 3x3 projection shortcuts of the raw block input (RobustBench's DMPreActResNet)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_PreActBlock(cin, cout, stride, nn.SiLU, same=True, raw_shortcut=True),
                   _PreActBlock(cout, cout, 1, nn.SiLU, same=True, raw_shortcut=True)]
        cin = cout
    layers += [nn.BatchNorm2d(512), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), 512, num_classes)


# The registry's names, for the config fields that choose a model (the schema's `model` enum); equal to
# MODELS' keys (tests/test_config_schema.py).
ModelName = Literal["small_cnn", "preact_resnet18", "dm_preact_resnet18", "wrn-16-4", "wrn-28-10", "wrn-70-16"]
MODELS: dict[str, Callable[[int], Classifier]] = {
    "small_cnn": small_cnn,
    "preact_resnet18": preact_resnet18,
    "dm_preact_resnet18": dm_preact_resnet18,
    "wrn-16-4": partial(wide_resnet, 16, 4),
    "wrn-28-10": partial(wide_resnet, 28, 10),
    "wrn-70-16": partial(wide_resnet, 70, 16),
}


def build(name: str, num_classes: int = 10, bn_momentum: float | None = None) -> Classifier:
    """A registry model; `bn_momentum` (PyTorch convention: the weight of the new batch statistic)
    replaces PyTorch's 0.1 in every batch norm when given."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name](num_classes)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set the running-statistics momentum of every batch norm. Robust training uses 0.01, as the
    references: Haiku BatchNorm decay_rate 0.99 (deepmind-research adversarial_robustness/jax/model_zoo.py
    L37, L98) and the PyTorch port's WRN (core/models/wideresnetwithswish.py L34, L39, L135)."""
    if not 0 < momentum <= 1:
        raise ValueError(f"batch-norm momentum {momentum} outside (0, 1]")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


# Stamped into every saved classifier: WideResNets saved before their stride-2 convolutions padded as `SAME`
# have the same weights' shapes but computed another function, so loading refuses them rather than
# evaluating them silently wrong.
WRN_PADDING = "same"


def save_checkpoint(path, model: nn.Module, name: str, num_classes: int, extra: dict | None = None) -> None:
    """Save weights with the architecture name, so loading checks it (atomic)."""
    from pipeline.checkpoint import save_atomic
    save_atomic({"model": name, "num_classes": num_classes, "state_dict": model.state_dict(),
                 "wrn_padding": WRN_PADDING, **(extra or {})}, path)


def load_checkpoint(path, device: torch.device | str = "cpu", expected: str | None = None) -> Classifier:
    """Load a classifier saved by save_checkpoint; name the file when it does not fit."""
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model checkpoint missing") from None
    except Exception as error:  # truncated zip, not a torch file
        raise ValueError(f"{path}: unreadable model checkpoint ({error})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{path}: not a robustgen classifier checkpoint")
    if expected is not None and payload["model"] != expected:
        raise ValueError(f"{path}: holds a {payload['model']} model, expected {expected}")
    if str(payload["model"]).startswith("wrn-") and payload.get("wrn_padding") != WRN_PADDING:
        raise ValueError(f"{path}: a {payload['model']} saved before WideResNets padded stride-2 convolutions as "
                         "SAME (docs/fidelity.md); retrain it")
    model = build(payload["model"], payload["num_classes"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit {payload['model']}: {error}") from None
    return model.to(device).eval()


# The two model files of a robust-training run: best (chosen on the validation split) and last.
CheckpointKind = Literal["best", "last"]


def checkpoint_kind(path: Path | str, expected: CheckpointKind | None = None) -> dict[str, Any]:
    """Which of a run's checkpoints a model file is: {"checkpoint": "last" | "best" | "", "checkpoint_epoch":
    the epoch it was taken at or None}, as train_robust stores them. `expected` (evaluate.checkpoint) must
    match when the file names itself, so an evaluation never attacks another checkpoint than it reports."""
    payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    kind = str(payload.get("checkpoint", "")) if isinstance(payload, dict) else ""
    if expected is not None and kind and kind != expected:
        raise ValueError(f"{path}: is the {kind} checkpoint of its run, but evaluate.checkpoint is {expected}")
    return {"checkpoint": kind, "checkpoint_epoch": payload.get("epoch") if isinstance(payload, dict) else None}


def describe_device(device: torch.device) -> str:
    """`cpu`, or `cuda <GPU name> (sm_<capability>)`: floating-point results differ between these, so
    outputs that promise reproducible bytes record it."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda {torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; tests and CI run on the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is cuda but no CUDA device is visible")
    return torch.device(name)
