"""CutMix (Yun et al., ICCV 2019) for robust training, as combined with weight averaging by Rebuffi et al.
(2021, "Data augmentation can improve robustness").

For each selected image i (`train_robust.cutmix_apply_to`: real, generated or both rows of the batch), a
partner j is drawn from the other selected rows of the same batch, lam ~ Beta(alpha, alpha), and a box
of area (1 - lam) of the image (centre uniform, clipped at the border) is pasted from j into i. The
label weights follow the area actually pasted after clipping: lam_i = 1 - box area / image area, so
the loss is lam_i * CE(y_i) + (1 - lam_i) * CE(y_j). Rows not selected keep lam = 1.

All randomness comes from one numpy generator seeded by (seed, run, step), so a resumed run mixes
exactly as the uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

ApplyTo = Literal["real", "generated", "both"]   # rows of a batch CutMix may touch
APPLY_TO: tuple[ApplyTo, ...] = get_args(ApplyTo)


@dataclass(frozen=True)
class Mix:
    """Partner labels, their label smoothing and the weight of the image's own label, per row."""
    y_partner: torch.Tensor
    smoothing_partner: torch.Tensor
    lam: torch.Tensor


def boxes(height: int, width: int, lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 4 boxes (top, bottom, left, right) of area about (1 - lam) * H * W, clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(int), (width * cut).astype(int)
    cy, cx = rng.integers(0, height, len(lam)), rng.integers(0, width, len(lam))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return np.stack([top, bottom, left, right], axis=1)


def cutmix(x: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor, selected: torch.Tensor, alpha: float,
           rng: np.random.Generator) -> tuple[torch.Tensor, Mix]:
    """Mix the selected rows of a batch (NCHW); returns the new images and the label mix."""
    n, _, height, width = x.shape
    top, bottom, left, right = (np.zeros(n, dtype=np.int64) for _ in range(4))
    partner = np.arange(n)
    rows = torch.nonzero(selected.cpu(), as_tuple=False).flatten().numpy()
    if len(rows) >= 2:
        partner[rows] = rows[rng.permutation(len(rows))]
        top[rows], bottom[rows], left[rows], right[rows] = boxes(height, width, rng.beta(alpha, alpha, len(rows)),
                                                                 rng).T
    lam = torch.from_numpy(1.0 - (bottom - top) * (right - left) / (height * width)).float()
    # One vectorised paste for the whole batch (no per-image loop): rows outside their box keep x.
    hh, ww = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    box_t, box_b, box_l, box_r = (torch.from_numpy(v).view(-1, 1, 1) for v in (top, bottom, left, right))
    inside = ((hh >= box_t) & (hh < box_b) & (ww >= box_l) & (ww < box_r)).unsqueeze(1).to(x.device)  # N x 1 x H x W
    index = torch.from_numpy(partner).to(x.device)
    mixed = torch.where(inside, x[index], x)
    return mixed, Mix(y[index.to(y.device)], smoothing[index.to(smoothing.device)], lam.to(x.device))


def selection(apply_to: ApplyTo, is_generated: torch.Tensor) -> torch.Tensor:
    """Rows CutMix may touch under `train_robust.cutmix_apply_to`."""
    if apply_to == "both":
        return torch.ones_like(is_generated, dtype=torch.bool)
    if apply_to == "generated":
        return is_generated.bool()
    if apply_to == "real":
        return ~is_generated.bool()
    raise ValueError(f"train_robust.cutmix_apply_to: unknown {apply_to!r}; known: {', '.join(APPLY_TO)}")
