"""Stage `evaluate_latent`: a robust model under a learned perturbation set (the CVAE threat model).

    python -m pipeline.evaluate_latent --params params.yaml --model models/robust/{run}/best.pt \\
        --cvae models/generators/cvae/model.pt --test data/cifar10/test.h5 \\
        --out results/evaluate/{run}/cvae.json --out-examples results/evaluate/{run}/cvae.h5

On the first `evaluate.n_eval` test images it reports three accuracies (Wong and Kolter, 2021, Sec. 5):
clean; on corrupted copies (the CVAE's corruption families, seeded); and under the worst case of the
learned set, found by projected gradient ascent of the cross-entropy in the latent L2 ball of the
radius estimated when the CVAE was trained (`evaluate.pgd_steps` steps, step 2.5 r / steps). The row
goes to the table with threat `cvae`: its `pgd_acc` is the latent-attack accuracy, `corrupted_acc` its
own column, and no AutoAttack value (AutoAttack attacks pixel norms, not this set). The job is minutes
even at paper scale (one decoder and classifier pass per step), so it has no partial-result resume: a
killed job reruns, and its outputs appear only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import corruptions, models, seeding
from pipeline import params as params_mod
from pipeline.generators import cvae
from pipeline.inference import predict_labels, to_float
from pipeline.latent_attack import LatentSet
from pipeline.shards import atomic_path, file_sha256, read_attrs, read_imageset, write_arrays

log = logging.getLogger("pipeline.evaluate_latent")
THREAT = "cvae"


def evaluate(model: torch.nn.Module, generator: cvae.CVAE, cvae_state: dict[str, Any], images: np.ndarray,
             labels: np.ndarray, n_eval: int, batch_size: int, steps: int, seed: int,
             device: torch.device) -> dict[str, np.ndarray]:
    """Per-example correctness on clean, corrupted and worst-case latent perturbations: the worst case is
    the member of each image's learned set maximising the model's cross-entropy."""
    images, labels = images[:n_eval], labels[:n_eval]
    corrupted, kinds = corruptions.corrupt(images, seeding.numpy_rng(seed, "evaluate_latent", "corrupt"),
                                           tuple(cvae_state["config"]["corruptions"]))
    latent = LatentSet(generator, float(cvae_state["radius"]))
    return {"index": np.arange(len(images)), "label": labels, "corruption": kinds,
            "clean_correct": predict_labels(model, images, batch_size, device, "evaluate cvae: clean") == labels,
            "corrupted_correct": predict_labels(model, corrupted, batch_size, device,
                                                "evaluate cvae: corrupted") == labels,
            "latent_correct": latent.robust_mask(model, to_float(images, device),
                                                 torch.from_numpy(labels).to(device), steps, batch_size)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate_latent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True, help="robust model checkpoint")
    parser.add_argument("--cvae", type=Path, required=True, help="models/generators/cvae/model.pt")
    parser.add_argument("--test", type=Path, required=True, help="test image set (HDF5)")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON")
    parser.add_argument("--out-examples", type=Path, required=True, help="per-example results (HDF5)")
    parser.add_argument("--run", required=True, help="run name in the JSON (the DAG's {run}; never read from a path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    cfg = cfg_all["evaluate"]
    seed, device = cfg_all["base"]["seed"], models.resolve_device(cfg_all["base"]["device"])
    run = args.run
    try:
        model = models.load_checkpoint(args.model, device).requires_grad_(False)
        kind = models.checkpoint_kind(args.model, expected=cfg["checkpoint"])
        generator, state = cvae.load_model(args.cvae, device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    images, labels = read_imageset(args.test, verify=True)
    result = evaluate(model, generator, state, images, labels, cfg["n_eval"], cfg["batch_size"], cfg["pgd_steps"],
                      seed, device)
    acc = {key.replace("_correct", "_acc"): float(result[key].mean())
           for key in ("clean_correct", "corrupted_correct", "latent_correct")}
    model_sha256, test_sha256 = file_sha256(args.model), read_attrs(args.test)["sha256"]
    radius = float(state["radius"])
    report = {
        "run": run, "threat": THREAT, "eps_label": f"latent {radius:.3g}", "radius": radius, "eps_255": None,
        "n_eval": len(result["index"]), "clean_acc": acc["clean_acc"], "corrupted_acc": acc["corrupted_acc"],
        "latent_acc": acc["latent_acc"], "pgd_acc": acc["latent_acc"], "pgd_steps": cfg["pgd_steps"],
        "autoattack_acc": None, "flags": [], "flag_reasons": {}, "gradient_masking_suspected": False,
        "cvae_path": str(args.cvae), "cvae_sha256": file_sha256(args.cvae), "cvae_errors": state["errors"],
        "model_path": str(args.model), "model_sha256": model_sha256, "test_path": str(args.test),
        "test_sha256": test_sha256, "examples_path": str(args.out_examples), "seed": seed, **kind,
    }
    write_arrays(args.out_examples, result, {"run": run, "threat": THREAT, "model_sha256": model_sha256,
                                             "test_sha256": test_sha256, "radius": radius})
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    log.info("run %s: clean %.4f  corrupted %.4f  latent attack (r=%.3g, %d steps) %.4f on %d images", run,
             acc["clean_acc"], acc["corrupted_acc"], radius, cfg["pgd_steps"], acc["latent_acc"], report["n_eval"])


if __name__ == "__main__":
    main()
