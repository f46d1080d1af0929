"""Stage `threat_model`: which threat each robust-training run is attacked with, as one small file per run.

    python -m pipeline.threat_model --params params.yaml --run {run} \\
        --generators-dir models/generators --out-dir models/threat      # writes models/threat/{run}.json
    python -m pipeline.threat_model --params params.yaml --run all ...  # every run (DVC's one stage)

Why a stage: a run trained inside a learned perturbation set (`train_robust.threat: cvae`, e.g. the
`latent_at` variant) depends on the CVAE model; a norm-ball run does not, and must not rerun (days of
GPU at paper scale) when the CVAE is retrained. DVC cannot give a stage a dependency under a condition,
so its one threat_model stage depends on the whole folder of generator models and writes
    {"run": ..., "threat": "linf"}                                   for a norm ball (never changes), or
    {"run": ..., "threat": "cvae", "model_path", "model_sha256", "radius"}   for the learned set;
train_robust depends on its own run's file only. The file is also what train_robust loads: the
learned set's model is read from `model_path` and refused when its sha256 differs (a stale file).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import params as params_mod
from pipeline.attacks import random_start
from pipeline.generators import cvae
from pipeline.shards import atomic_path, file_sha256

log = logging.getLogger("pipeline.threat_model")
LEARNED = params_mod.LEARNED_THREATS   # threats learned by a generator of the same name; the rest are norm balls


@dataclass
class LatentSet:
    """A learned perturbation set S(x) = {g(mu_p(x) + sigma_p(x) u, x) : ||u||_2 <= radius} (pipeline/
    generators/cvae.py) as an attack: projected gradient ascent of a loss of the model's logits over u."""
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


def describe(cfg: dict[str, Any], run: str, generators_dir: Path) -> dict[str, Any]:
    """The threat-model file of `run`: its threat, plus the learned set's model identity when learned."""
    threat = params_mod.train_robust_setting(cfg, run, "threat")
    if threat not in LEARNED:
        return {"run": run, "threat": threat}
    path = generators_dir / threat / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run {run!r} trains in the learned {threat} set, but its generator "
                                f"model is missing (train it first: it is in generate.generators)")
    _, state = cvae.load_model(path)
    return {"run": run, "threat": threat, "model_path": str(path), "model_sha256": file_sha256(path),
            "radius": float(state["radius"])}


def write(description: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / f"{description['run']}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return path


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.threat_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--run", required=True, help="a run name (params `runs`), or all")
    parser.add_argument("--generators-dir", type=Path, default=Path("models/generators"))
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = params_mod.load(args.params)
        runs = params_mod.runs(cfg) if args.run == "all" else [args.run]
        if args.run != "all" and args.run not in params_mod.runs(cfg):
            raise params_mod.ParamsError(f"run {args.run!r} is not one of {params_mod.runs(cfg)}")
        for run in runs:
            description = describe(cfg, run, args.generators_dir)
            log.info("%s: %s", write(description, args.out_dir), description["threat"])
    except (params_mod.ParamsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
