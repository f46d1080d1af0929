"""Common corruptions computed locally, as training pairs (x, corrupted x) for the CVAE perturbation set.

CIFAR-10-C cannot be downloaded here, and the `imagecorruptions` package pulls in OpenCV and
scikit-image, so these are our own versions of five of Hendrycks and Dietterich's families: Gaussian
noise, Gaussian blur, contrast, fog (a smooth random haze) and JPEG. Each image gets one family and a
severity in [0, 1] drawn from the caller's generator, so a set of pairs is reproducible from its seed.
A user who has CIFAR-10-C (or any other pairs) passes them as an .npz instead (see `load_pairs`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.inference import to_float

Corruption = Literal["noise", "blur", "contrast", "fog", "jpeg"]   # FAMILIES' keys
KINDS: tuple[Corruption, ...] = get_args(Corruption)


def _to_float(image: np.ndarray) -> torch.Tensor:
    """One uint8 H x W x C image -> float C x H x W in [0, 1], keeping the pixels' HWC memory order."""
    return to_float(image[None], memory_format=torch.channels_last)[0]


def _noise(x: torch.Tensor, severity: float, rng: np.random.Generator) -> torch.Tensor:
    sigma = 0.02 + 0.08 * severity
    return x + torch.from_numpy(rng.normal(0, sigma, x.shape).astype(np.float32))


def _blur(x: torch.Tensor, severity: float, rng: np.random.Generator) -> torch.Tensor:
    sigma = 0.4 + 1.2 * severity
    radius = 3
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    image = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    image = F.conv2d(image, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    image = F.conv2d(image, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return image.squeeze(0)


def _contrast(x: torch.Tensor, severity: float, rng: np.random.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2), keepdim=True)
    return mean + (x - mean) * (1.0 - 0.7 * severity)


def _fog(x: torch.Tensor, severity: float, rng: np.random.Generator) -> torch.Tensor:
    haze = torch.from_numpy(rng.uniform(0, 1, (1, 1, 4, 4)).astype(np.float32))
    haze = F.interpolate(haze, size=x.shape[1:], mode="bicubic", align_corners=False)[0]
    amount = 0.2 + 0.4 * severity
    return x * (1 - amount) + (0.5 + 0.5 * haze) * amount


def _jpeg(x: torch.Tensor, severity: float, rng: np.random.Generator) -> torch.Tensor:
    quality = int(round(85 - 75 * severity))
    array = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return _to_float(decoded.copy())


FAMILIES = {"noise": _noise, "blur": _blur, "contrast": _contrast, "fog": _fog, "jpeg": _jpeg}


def corrupt(images: np.ndarray, rng: np.random.Generator, kinds: tuple[str, ...] = KINDS
            ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 32 x 32 x 3 -> (corrupted uint8 images, index into `kinds` per image)."""
    unknown = set(kinds) - set(FAMILIES)
    if unknown or not kinds:
        raise ValueError(f"unknown corruptions {sorted(unknown)}; known: {', '.join(KINDS)}")
    choice = rng.integers(0, len(kinds), len(images))
    severity = rng.uniform(0, 1, len(images))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        x = _to_float(image)
        y = FAMILIES[kinds[choice[i]]](x, float(severity[i]), rng).clamp(0, 1)
        out[i] = (y * 255).round().byte().permute(1, 2, 0).numpy()
    return out, choice


def load_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(clean, perturbed) uint8 N x 32 x 32 x 3 from an .npz with arrays `clean` and `perturbed`.

    For CIFAR-10-C: `perturbed` = the corruption arrays concatenated, `clean` = the matching clean test
    images repeated (each corruption file holds the 10,000 test images at 5 severities).
    """
    with np.load(path) as data:
        if "clean" not in data or "perturbed" not in data:
            raise ValueError(f"{path}: needs arrays `clean` and `perturbed` (found {sorted(data.files)})")
        clean, perturbed = data["clean"], data["perturbed"]
    if clean.shape != perturbed.shape or clean.ndim != 4 or clean.shape[1:] != (32, 32, 3) or clean.dtype != np.uint8:
        raise ValueError(f"{path}: `clean` and `perturbed` must both be uint8 N x 32 x 32 x 3 "
                         f"(got {clean.dtype} {clean.shape} and {perturbed.dtype} {perturbed.shape})")
    return clean, perturbed
