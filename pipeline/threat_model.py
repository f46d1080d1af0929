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
train_robust depends on its own run's file only. The file is also what train_robust loads
(pipeline.latent_attack.load): the learned set's model is read from `model_path` and refused when its
sha256 differs (a stale file).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipeline import params as params_mod
from pipeline.generators import cvae
from pipeline.latent_attack import LEARNED
from pipeline.shards import atomic_path, file_sha256

log = logging.getLogger("pipeline.threat_model")


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
