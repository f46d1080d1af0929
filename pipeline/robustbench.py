"""RobustBench's model-zoo layout <-> our models, for the paper line's two architectures.

RobustBench 1.1.1 holds DeepMind's PyTorch models as `DMWideResNet` and `DMPreActResNet`
(robustbench/model_zoo/architectures/dm_wide_resnet.py, a copy of deepmind-research
adversarial_robustness/pytorch/model_zoo.py), built with `activation_fn=Swish` and the dataset's mean/std
(robustbench/model_zoo/cifar10.py L634-L641, L714-L721; cifar100.py L249-L256). Our `wide_resnet` and
`dm_preact_resnet18` (pipeline/models.py) compute the same function, so only the state-dict keys differ:
this module renames them both ways. Differences that are not names:

- mean/std: RobustBench's are non-persistent buffers (not in its files) passed to the constructor, the
  dataset's constants by number of classes (CIFAR-10 / CIFAR-100); ours are persistent buffers of
  `Classifier.normalize`. Import sets ours from the class count; export records them for the constructor.
- released files: a bare state dict or {"state_dict": ...}, keys possibly prefixed 'module.' (saved from
  nn.DataParallel); RobustBench's `load_model` strips the prefix (robustbench/utils.py L170-L178), as we do.
- Swish is RobustBench's own autograd function x * sigmoid(x); ours is nn.SiLU, the same function (logits
  agree to float rounding, tests/test_robustbench.py).

Nothing here downloads: zoo files are read from a local path.
"""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import models
from pipeline.shards import file_sha256

ARCHITECTURES = ("DMWideResNet", "DMPreActResNet")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# mean/std RobustBench's zoo constructs the DM models with, by number of classes (dm_wide_resnet.py L25-L28)
MEAN_STD = {10: (CIFAR10_MEAN, CIFAR10_STD), 100: (CIFAR100_MEAN, CIFAR100_STD)}
_BLOCK_PARTS = {  # our _PreActBlock's sub-modules -> DeepMind's names (DMWideResNet, DMPreActResNet)
    "DMWideResNet": {"bn1": "batchnorm_0", "conv1": "conv_0", "bn2": "batchnorm_1", "conv2": "conv_1",
                     "shortcut": "shortcut"},
    "DMPreActResNet": {"bn1": "batchnorm_0", "conv1": "conv_2d_1", "bn2": "batchnorm_1", "conv2": "conv_2d_2",
                       "shortcut": "shortcut"},
}


class ZooError(ValueError):
    """A zoo file or model that does not fit; the message is one line naming the file and the cause."""


@dataclass(frozen=True)
class ZooArchitecture:
    """One RobustBench architecture instance: class name and the constructor arguments it needs."""
    name: str                      # DMWideResNet or DMPreActResNet
    depth: int
    width: int                     # 0 for DMPreActResNet (its constructor's convention)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def label(self) -> str:
        """DMWideResNet-70-16, DMPreActResNet-18."""
        return f"{self.name}-{self.depth}" + (f"-{self.width}" if self.name == "DMWideResNet" else "")

    @property
    def robustgen_model(self) -> str:
        """Our registry's name (wrn-70-16, dm_preact_resnet18); a shape it lacks still builds (build_model)."""
        return f"wrn-{self.depth}-{self.width}" if self.name == "DMWideResNet" else f"dm_preact_resnet{self.depth}"

    @property
    def paper_name(self) -> str:
        """The architecture as RobustBench's model_info files spell it (WideResNet-70-16, ResNet-18)."""
        return f"WideResNet-{self.depth}-{self.width}" if self.name == "DMWideResNet" else f"ResNet-{self.depth}"

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of RobustBench's class, besides activation_fn=Swish."""
        return {"num_classes": self.num_classes, "depth": self.depth, "width": self.width,
                "mean": self.mean, "std": self.std}


def build_model(arch: ZooArchitecture) -> models.Classifier:
    """Our model of the architecture, normalising with its mean/std."""
    if arch.name == "DMWideResNet":
        model = models.wide_resnet(arch.depth, arch.width, arch.num_classes)
    elif arch.depth == 18:
        model = models.dm_preact_resnet18(arch.num_classes)
    else:
        raise ZooError(f"DMPreActResNet-{arch.depth}: only depth 18 has a counterpart here (dm_preact_resnet18)")
    model.normalize = models.Normalize(arch.mean, arch.std)
    return model


def _zoo_key(arch: ZooArchitecture, key: str) -> str:
    """Our state-dict key -> RobustBench's (body.K is the stem, K blocks, then the last batch norm)."""
    blocks = 3 * ((arch.depth - 4) // 6) if arch.name == "DMWideResNet" else 8
    part, _, rest = key.partition(".")
    if part == "head":
        return f"logits.{rest}"
    index_text, _, rest = rest.partition(".")
    index = int(index_text)
    if index == 0:
        return ("init_conv." if arch.name == "DMWideResNet" else "conv_2d.") + rest
    if index == blocks + 1:
        return f"batchnorm.{rest}"
    sub, _, param = rest.partition(".")
    name = _BLOCK_PARTS[arch.name][sub]
    if arch.name == "DMWideResNet":
        per_group = blocks // 3
        return f"layer.{(index - 1) // per_group}.block.{(index - 1) % per_group}.{name}.{param}"
    return f"layer_{(index - 1) // 2}.{(index - 1) % 2}.{name}.{param}"


def key_map(model: nn.Module, arch: ZooArchitecture) -> dict[str, str]:
    """Our key -> RobustBench's key, for every state-dict entry but the normalisation buffers."""
    return {key: _zoo_key(arch, key) for key in model.state_dict() if not key.startswith("normalize.")}


def unwrap(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict of a released file: {"state_dict": ...} or bare, 'module.' prefixes removed."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ZooError(f"{source}: not a RobustBench state dict (a mapping of names to tensors)")
    return OrderedDict((re.sub(r"^(module\.)+", "", key), value) for key, value in payload.items())


def infer(state_dict: dict[str, torch.Tensor], architecture: str, source: str) -> ZooArchitecture:
    """Depth, width and classes of a zoo state dict said to hold `architecture`."""
    if architecture not in ARCHITECTURES:
        raise ZooError(f"{source}: unknown RobustBench architecture {architecture!r}; "
                       f"supported: {', '.join(ARCHITECTURES)}")
    logits = state_dict.get("logits.weight")
    if logits is None or logits.dim() != 2:
        raise ZooError(f"{source}: not a {architecture} state dict (no 2-d 'logits.weight'; keys start "
                       f"{', '.join(list(state_dict)[:3]) or 'none'})")
    num_classes = int(logits.shape[0])
    if num_classes not in MEAN_STD:
        raise ZooError(f"{source}: {num_classes} classes; RobustBench's DM models have 10 or 100")
    mean, std = MEAN_STD[num_classes]
    if architecture == "DMWideResNet":
        per_group = len({m.group(1) for k in state_dict if (m := re.match(r"layer\.0\.block\.(\d+)\.", k))})
        width, rest = divmod(int(logits.shape[1]), 64)
        if not per_group or rest or not width:
            raise ZooError(f"{source}: not a DMWideResNet state dict (no layer.0.block.* keys or a "
                           f"{int(logits.shape[1])}-wide head)")
        return ZooArchitecture(architecture, 6 * per_group + 4, width, num_classes, mean, std)
    counts = tuple(len({m.group(1) for k in state_dict if (m := re.match(rf"layer_{g}\.(\d+)\.", k))})
                   for g in range(4))
    depths: dict[tuple[int, ...], int] = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
    depth = depths.get(counts)
    if depth is None:
        raise ZooError(f"{source}: not a DMPreActResNet state dict (blocks per layer {counts})")
    return ZooArchitecture(architecture, depth, 0, num_classes, mean, std)


def from_zoo(state_dict: dict[str, torch.Tensor], architecture: str, source: str = "state dict"
             ) -> tuple[models.Classifier, ZooArchitecture]:
    """Our model holding a RobustBench state dict's weights; every key must be used and fit."""
    state_dict = unwrap(state_dict, source)
    arch = infer(state_dict, architecture, source)
    model = build_model(arch)
    mapping = key_map(model, arch)
    missing = [zoo for zoo in mapping.values() if zoo not in state_dict]
    unexpected = sorted(set(state_dict) - set(mapping.values()))
    if missing or unexpected:
        raise ZooError(f"{source}: not a {arch.label} state dict: missing {_few(missing)}, "
                       f"unexpected {_few(unexpected)}")
    ours = model.state_dict()
    wrong = [f"{zoo} {tuple(state_dict[zoo].shape)} (expected {tuple(ours[key].shape)})"
             for key, zoo in mapping.items() if state_dict[zoo].shape != ours[key].shape]
    if wrong:
        raise ZooError(f"{source}: not a {arch.label} state dict: shapes {_few(wrong)}")
    model.load_state_dict({**ours, **{key: state_dict[zoo] for key, zoo in mapping.items()}})
    return model.eval(), arch


def _few(items: list[str]) -> str:
    return "none" if not items else ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def describe(model: nn.Module) -> ZooArchitecture:
    """The RobustBench architecture our model is an instance of; ZooError for one without a counterpart."""
    if not isinstance(model, models.Classifier) or not isinstance(model.body, nn.Sequential):
        raise ZooError(f"{type(model).__name__}: not one of our classifiers")
    layers = list(model.body)
    blocks = [layer for layer in layers if isinstance(layer, models._PreActBlock)]
    num_classes = model.head.out_features
    acts = {type(m) for m in model.modules() if isinstance(m, nn.SiLU | nn.ReLU)}
    if not blocks or acts != {nn.SiLU} or not all(block.same for block in blocks):
        raise ZooError("only our SiLU WideResNets and dm_preact_resnet18 have a RobustBench counterpart "
                       "(DMWideResNet / DMPreActResNet with Swish)")
    mean, std = _constants(model.normalize.mean), _constants(model.normalize.std)
    if all(block.raw_shortcut for block in blocks) and len(blocks) == 8:
        return ZooArchitecture("DMPreActResNet", 18, 0, num_classes, mean, std)
    width = model.head.in_features // 64
    return ZooArchitecture("DMWideResNet", 6 * (len(blocks) // 3) + 4, width, num_classes, mean, std)


def _constants(buffer: torch.Tensor) -> tuple[float, ...]:
    """A normalisation buffer as the dataset constants it holds (float32 read back to the decimals), so
    the export's constructor arguments are RobustBench's own."""
    values = buffer.detach().cpu().flatten().float()
    for known in (c for pair in MEAN_STD.values() for c in pair):
        if torch.equal(values, torch.tensor(known, dtype=torch.float32)):
            return known
    return tuple(float(v) for v in values)


def to_zoo(model: nn.Module) -> tuple[OrderedDict[str, torch.Tensor], ZooArchitecture]:
    """RobustBench's state dict of our model (what its class's load_state_dict takes, strict)."""
    arch = describe(model)
    ours = model.state_dict()
    return OrderedDict((zoo, ours[key].detach().cpu().clone()) for key, zoo in key_map(model, arch).items()), arch


def read_zoo_file(path: Path | str) -> Any:
    """A zoo file's contents: tensors only (weights_only), never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: zoo checkpoint missing") from None
    except Exception as error:  # not a torch file, truncated, pickled objects
        raise ZooError(f"{path}: unreadable zoo checkpoint ({str(error).splitlines()[0]})") from None


def zoo_architecture(path: Path | str, architecture: str) -> ZooArchitecture:
    """The architecture of a zoo file, read without building the model (the evaluation's merge job)."""
    return infer(unwrap(read_zoo_file(path), str(path)), architecture, str(path))


def load_zoo_file(path: Path | str, architecture: str) -> tuple[models.Classifier, ZooArchitecture, str]:
    """Our model from a local zoo file (never downloaded), its architecture and the file's sha256."""
    model, arch = from_zoo(read_zoo_file(path), architecture, str(path))
    return model, arch, file_sha256(Path(path))


def import_robustbench() -> Any:
    """The optional `robustbench` package. Its 1.1.1 release requires `pyautoattack` but imports it under the
    git package's module name `autoattack` (robustbench/eval.py L10-L11), so `import robustbench` fails with
    pyautoattack alone; the alias makes the package importable (its `benchmark` still does not run with
    pyautoattack: docs/robustbench.md)."""
    import importlib
    import importlib.util
    if importlib.util.find_spec("autoattack") is None:
        import pyautoattack
        import pyautoattack.state
        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    return importlib.import_module("robustbench")


def initialise(model: nn.Module, path: Path | str, model_name: str) -> str:
    """Load a zoo file's weights into our `model_name` model (train_robust.init_checkpoint); the file's sha256."""
    architecture = ("DMPreActResNet" if model_name == "dm_preact_resnet18"
                    else "DMWideResNet" if model_name.startswith("wrn-") else None)
    if architecture is None:
        raise ZooError(f"{path}: train_robust.model {model_name} has no RobustBench counterpart "
                       "(a zoo initialisation needs a wrn-* model or dm_preact_resnet18)")
    try:
        zoo, arch, sha = load_zoo_file(path, architecture)
    except FileNotFoundError as error:
        raise ZooError(str(error)) from None
    if arch.robustgen_model != model_name:
        raise ZooError(f"{path}: holds a {arch.label} ({arch.robustgen_model}), but train_robust.model is {model_name}")
    model.load_state_dict(zoo.state_dict())
    return sha


def robustbench_class(arch: ZooArchitecture) -> nn.Module:
    """RobustBench's own model of the architecture (needs the optional `robustbench` package)."""
    import_robustbench()
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMPreActResNet, DMWideResNet, Swish
    cls = DMWideResNet if arch.name == "DMWideResNet" else DMPreActResNet
    return cls(activation_fn=Swish, **arch.kwargs())
