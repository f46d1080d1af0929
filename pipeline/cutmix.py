"""CutMix (Yun et al., ICCV 2019) for robust training, as combined with weight averaging by Rebuffi et al.
(2021, "Data augmentation can improve robustness").

For each selected image i (`train_robust.cutmix_apply_to`: real, generated or both rows of the batch), a
partner j is drawn from the selected rows of the same batch (a permutation), lam ~ Beta(alpha, alpha),
and a box of area (1 - lam) of the image (centre uniform, clipped at the border) is pasted from j into
i. The label weights follow the area actually pasted after clipping: lam_i = 1 - box area / image area,
so the loss is lam_i * CE(y_i) + (1 - lam_i) * CE(y_j). Rows not selected keep lam = 1.

`train_robust.cutmix_scheme` (docs/fidelity.md):
- `reference`, as the JAX reference (deepmind-research adversarial_robustness/jax/utils.py:130-167,
  `cutmix`): one lam and one box for the whole batch of a rank (the reference draws one per device
  batch), and the TRADES attack regresses away from the mixed soft labels instead of the clean
  prediction (experiment.py:271-275, `target_labels = target_probs`); the reference refuses a label
  attack (PGD-AT) with CutMix (experiment.py:268-270), and so does params validation.
- `per_row`: a lam and a box per row, and the attack's target is the clean prediction (TRADES) or the
  image's own label (PGD-AT), as without CutMix.

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
Scheme = Literal["reference", "per_row"]         # train_robust.cutmix_scheme (module docstring)
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)


@dataclass(frozen=True)
class Mix:
    """Partner labels, their label smoothing and the weight of the image's own label, per row; and the
    probabilities the TRADES attack moves away from (None: the clean prediction)."""
    y_partner: torch.Tensor
    smoothing_partner: torch.Tensor
    lam: torch.Tensor
    attack_target: torch.Tensor | None = None


def soft_labels(y: torch.Tensor, smoothing: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot labels with per-row label smoothing: (1 - s) * onehot + s / K."""
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    s = smoothing.float().unsqueeze(1)
    return (1 - s) * onehot + s / num_classes


def boxes(height: int, width: int, lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 4 boxes (top, bottom, left, right) of area about (1 - lam) * H * W, clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(int), (width * cut).astype(int)
    cy, cx = rng.integers(0, height, len(lam)), rng.integers(0, width, len(lam))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return np.stack([top, bottom, left, right], axis=1)


def cutmix(x: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor, selected: torch.Tensor, alpha: float,
           rng: np.random.Generator, scheme: Scheme, num_classes: int) -> tuple[torch.Tensor, Mix]:
    """Mix the selected rows of a batch (NCHW); returns the new images and the label mix. `selected` is
    read on the host: pass the loader's CPU tensor (no device synchronisation)."""
    if scheme not in SCHEMES:
        raise ValueError(f"train_robust.cutmix_scheme: unknown {scheme!r}; known: {', '.join(SCHEMES)}")
    n, _, height, width = x.shape
    top, bottom, left, right = (np.zeros(n, dtype=np.int64) for _ in range(4))
    partner = np.arange(n)
    rows = torch.nonzero(selected.cpu(), as_tuple=False).flatten().numpy()
    if len(rows) >= 2:
        partner[rows] = rows[rng.permutation(len(rows))]
        draws = 1 if scheme == "reference" else len(rows)   # one lam and box for the batch, or one per row
        box = boxes(height, width, rng.beta(alpha, alpha, draws), rng)
        top[rows], bottom[rows], left[rows], right[rows] = np.broadcast_to(box, (len(rows), 4)).T
    lam = torch.from_numpy(1.0 - (bottom - top) * (right - left) / (height * width)).float()
    # One vectorised paste for the whole batch (no per-image loop): rows outside their box keep x.
    hh, ww = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    box_t, box_b, box_l, box_r = (torch.from_numpy(v).view(-1, 1, 1) for v in (top, bottom, left, right))
    inside = ((hh >= box_t) & (hh < box_b) & (ww >= box_l) & (ww < box_r)).unsqueeze(1).to(x.device)  # N x 1 x H x W
    index = torch.from_numpy(partner).to(x.device)
    mixed = torch.where(inside, x[index], x)
    y_partner, smoothing_partner, lam = y[index.to(y.device)], smoothing[index.to(smoothing.device)], lam.to(x.device)
    target = None
    if scheme == "reference":
        weight = lam.unsqueeze(1)
        target = (weight * soft_labels(y, smoothing, num_classes)
                  + (1 - weight) * soft_labels(y_partner, smoothing_partner, num_classes))
    return mixed, Mix(y_partner, smoothing_partner, lam, target)


def selection(apply_to: ApplyTo, is_generated: torch.Tensor) -> torch.Tensor:
    """Rows CutMix may touch under `train_robust.cutmix_apply_to`."""
    if apply_to == "both":
        return torch.ones_like(is_generated, dtype=torch.bool)
    if apply_to == "generated":
        return is_generated.bool()
    if apply_to == "real":
        return ~is_generated.bool()
    raise ValueError(f"train_robust.cutmix_apply_to: unknown {apply_to!r}; known: {', '.join(APPLY_TO)}")
