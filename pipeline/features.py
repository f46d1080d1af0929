"""Feature spaces for the complementarity/coverage analysis: teacher penultimate, pixels, LPIPS.

Every extractor maps uint8 NHWC (or float NHWC in [0, 1]) images to float32 vectors whose squared
Euclidean distance is the analysis' distance:
- `teacher`: the teacher's penultimate features, unit-normalised (L2 then equals 2 - 2 cos).
- `pixels`: raw pixels, unit-normalised; a diagnostic only (see ../shared/notes/complementarity.md:
  in pixel space a Gaussian fit wrongly looks complementary).
- `lpips`: LPIPS (Zhang et al. 2018, AlexNet variant, the paper's choice). LPIPS(x, y) =
  sum_l mean_hw sum_c w_lc (f̂_lc(x) - f̂_lc(y))^2 with f̂ channel-normalised activations and w >= 0,
  which is exactly the squared L2 distance between the embeddings sqrt(w_lc / (H_l W_l)) f̂_lc(x), so
  1-NN search on these embeddings is exact LPIPS 1-NN. Weights come only from a local file (never
  downloaded): either a full `lpips.LPIPS(net='alex').state_dict()` saved with torch.save, or a folder
  with the lpips package's `alex.pth` (linear layers) and torchvision's `alexnet-owt-7be5be79.pth`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.inference import map_batches
from pipeline.models import Classifier

FeatureSpace = Literal["teacher", "pixels", "lpips"]
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
# AlexNet `features` indices that end each LPIPS slice (after the ReLU): relu1..relu5.
LPIPS_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))


class FeatureError(RuntimeError):
    """A feature space cannot be used here (e.g. LPIPS weights missing); the message says why."""


def unit_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    if np.asarray(images).dtype == np.uint8:
        flat /= 255.0
    return unit_normalise(flat)


def teacher_features(model: Classifier, images: np.ndarray, batch_size: int, device: torch.device,
                     desc: str | None = None) -> np.ndarray:
    return unit_normalise(map_batches(model.features, model, images, batch_size, device, desc))


class LPIPSEmbedding(nn.Module):
    """AlexNet-LPIPS as an explicit embedding: ||e(x) - e(y)||^2 == LPIPS(x, y)."""
    shift: torch.Tensor   # buffers, declared for the type checker (register_buffer sets them)
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import alexnet
        self.features = alexnet(weights=None).features[:12]  # conv1 .. relu5 (architecture only)
        self.lin = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in LPIPS_CHANNELS])
        # lpips ScalingLayer constants (inputs scaled to [-1, 1] first).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ((x * 2 - 1) - self.shift) / self.scale
        parts = []
        for (start, stop), weight in zip(LPIPS_SLICES, self.lin):
            for layer in self.features[start:stop]:
                h = layer(h)
            normed = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # lpips.normalize_tensor
            spatial = h.shape[2] * h.shape[3]
            parts.append((normed * (weight.clamp_min(0) / spatial).sqrt().view(1, -1, 1, 1)).flatten(1))
        return torch.cat(parts, dim=1)


def _lpips_state(path: Path) -> dict[str, torch.Tensor]:
    """Merge whatever local LPIPS files are there into {features.N.*, lin.K} keys."""
    path = Path(path)
    if path.is_dir():
        files = [path / "alex.pth", path / "alexnet-owt-7be5be79.pth"]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FeatureError(f"analysis.lpips_weights: {path} lacks {', '.join(missing)} "
                               "(LPIPS weights are never downloaded; copy them here)")
        raw = {**torch.load(files[0], map_location="cpu"), **torch.load(files[1], map_location="cpu")}
    elif path.is_file():
        raw = torch.load(path, map_location="cpu")
    else:
        raise FeatureError(f"analysis.lpips_weights: {path} not found (LPIPS weights are never downloaded; "
                           "set analysis.lpips_weights to a local file or folder, or use feature_space teacher)")
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if m := re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", key):
            state[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
            state[f"lin.{m.group(1)}"] = value.flatten()
    return state


def load_lpips(path: Path, device: torch.device | str = "cpu") -> LPIPSEmbedding:
    """The LPIPS embedding with local weights; FeatureError naming the path if they are incomplete."""
    net = LPIPSEmbedding()
    state = _lpips_state(path)
    expected = {k for k in net.state_dict() if k not in ("shift", "scale")}
    missing = sorted(expected - set(state))
    if missing:
        raise FeatureError(f"analysis.lpips_weights: {path} is not AlexNet-LPIPS weights "
                           f"(missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    net.load_state_dict(state, strict=False)
    return net.to(device).eval()


def lpips_features(net: LPIPSEmbedding, images: np.ndarray, batch_size: int, device: torch.device,
                   desc: str | None = None) -> np.ndarray:
    return map_batches(net, net, images, batch_size, device, desc)
