"""A learned perturbation set as an attack, and reading a run's threat-model file.

S(x) = {g(mu_p(x) + sigma_p(x) u, x) : ||u||_2 <= radius} for the CVAE g of pipeline/generators/cvae.py
(Wong and Kolter, 2021). Robust training searches it in its inner maximisation and validation,
pipeline.evaluate_latent reports accuracy under it. The `threat_model` stage writes the per-run file
that `load` reads; keeping the reader here lets training and evaluation use it without importing a
stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import params as params_mod
from pipeline.attacks import eval_mode, random_start
from pipeline.generators import cvae
from pipeline.inference import batches, predict_labels
from pipeline.shards import file_sha256

LEARNED = params_mod.LEARNED_THREATS   # threats learned by a generator of the same name; the rest are norm balls


@dataclass
class LatentSet:
    """A learned perturbation set as an attack: projected gradient ascent of a loss of the model's
    logits over the latent u of each image's set."""
    generator: cvae.CVAE
    radius: float

    @property
    def latent_dim(self) -> int:
        return self.generator.latent_dim

    def random_start(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """PGD's L2 random start (uniform direction, radius uniform in [0, radius]) in the latent space."""
        return random_start(torch.zeros(n, self.latent_dim, device=device), "l2", self.radius, generator)

    def attack(self, model: torch.nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
               steps: int, start: torch.Tensor | None = None) -> torch.Tensor:
        """The member of each image's set maximising objective(model(member)) after `steps` steps of
        cvae.latent_pgd (step 2.5 radius / steps); the prior network runs once per batch."""
        with torch.no_grad():
            decode = self.generator.members(x)

        def member(u: torch.Tensor) -> torch.Tensor:
            return decode(u).clamp(0, 1)

        u = cvae.latent_pgd(lambda v: objective(model(member(v))), self.latent_dim, len(x), self.radius, steps,
                            x.device, start=start)
        with torch.no_grad():
            return member(u)

    def robust_mask(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                    batch_size: int) -> np.ndarray:
        """Per image (bool): still classified correctly at the member of its set that the cross-entropy
        attack finds (from u = 0, so deterministic), `batch_size` images at a time, in eval mode. The
        learned-set counterpart of attacks.robust_accuracy."""
        masks = [np.zeros(0, dtype=bool)]
        with eval_mode(model):
            for part in batches(len(x), batch_size):
                xb, yb = x[part], y[part]
                x_adv = self.attack(model, xb, _cross_entropy(yb), steps)
                masks.append(predict_labels(model, x_adv, len(x_adv), x.device) == yb.cpu().numpy())
        return np.concatenate(masks)


def _cross_entropy(y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The attack objective: summed cross-entropy of the logits against labels y."""
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


def load(path: Path, threat: str, device: torch.device | str = "cpu") -> LatentSet | None:
    """Read a run's threat-model file: None for a norm ball, the LatentSet for a learned threat.
    Refuses a file written for another threat or whose model has changed since (rerun the stage)."""
    try:
        description = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable threat-model file ({error})") from None
    if description.get("threat") != threat:
        raise ValueError(f"{path}: describes threat {description.get('threat')!r}, but the run trains under "
                         f"{threat!r}; rerun `python -m pipeline.threat_model`")
    if threat not in LEARNED:
        return None
    model_path = Path(description["model_path"])
    if not model_path.exists() or file_sha256(model_path) != description["model_sha256"]:
        raise ValueError(f"{path}: {model_path} is missing or changed since this file was written; rerun "
                         "`python -m pipeline.threat_model`")
    generator, state = cvae.load_model(model_path, device)
    return LatentSet(generator, float(state["radius"]))
