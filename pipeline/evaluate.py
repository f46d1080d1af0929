"""Stage `evaluate`: clean, PGD and AutoAttack accuracy of one robust model under one threat model.

    python -m pipeline.evaluate --params params.yaml --model models/robust/{run}/best.pt \\
        --test data/cifar10/test.h5 --threat linf --workdir work/evaluate/{run}/linf \\
        --out results/evaluate/{run}/linf.json --out-examples results/evaluate/{run}/linf.h5

Attacks the first `evaluate.n_eval` test images with AutoAttack (the maintained `pyautoattack`
package, version "standard": APGD-CE, APGD-T, FAB-T, Square; never re-implemented here) and with the
project's one PGD (`pipeline.attacks`), at `evaluate.eps_255[threat]` / 255.

Resume: the images are cut into chunks of `chunk_size`; each finished chunk's per-example results go
atomically to `--workdir/chunk-XXXXXX.h5`, stamped with a fingerprint of everything that decides them
(model, test set, threat, eps, seeds, attack settings). A rerun keeps matching chunks and attacks only
the rest, so a killed evaluation redoes at most one chunk and ends with the same per-example results as
an uninterrupted one. AutoAttack's own `state_path` file is written per chunk in the workdir (it is
the package's progress record: attacks run, surviving points), but pyautoattack 0.2.0 cannot restore
from it (it saves the attack set as a string, so `from_disk` raises "different set of attacks", and its
restore branch leaves `y_adv` undefined); an unfinished chunk is therefore restarted from scratch,
which is deterministic because every attack reseeds from the explicit seed.

Sanity checks (RobustBench style, in the JSON and the log) flag results that look like gradient
masking: AutoAttack accuracy above PGD accuracy, robust above clean accuracy, PGD far above AutoAttack
(gradients too weak to find what the black-box Square attack finds), robust accuracy that does not fall
as eps grows (PGD on the first `n_sweep` images at `sweep_factors` x eps), perturbations outside the
eps-ball, and AutoAttack's own warnings (zero gradients, Square beats the gradient attacks, randomness).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import attacks, models, seeding
from pipeline import params as params_mod
from pipeline.attacks import Threat
from pipeline.inference import predict_labels, to_float
from pipeline.models import CheckpointKind
from pipeline.params import LearnedThreat
from pipeline.shards import ShardError, atomic_path, file_sha256, read_arrays, read_attrs, read_imageset, write_arrays

log = logging.getLogger("pipeline.evaluate")
NORMS: dict[Threat, str] = {"linf": "Linf", "l2": "L2"}  # our threat names -> AutoAttack's
# Flags that point at gradient masking (the others say the evaluation itself is broken).
# Heuristic: against an adversarially trained model a working attack removes most of the accuracy
# left at the smallest sweep eps by the largest (robust-accuracy-vs-eps curves fall steeply past the
# training eps); keeping more than this share means the attack does not use the larger budget.
SWEEP_KEEP = 0.5
MASKING_FLAGS = {"autoattack_above_pgd", "robust_above_clean", "pgd_far_above_autoattack",
                 "sweep_not_decreasing", "autoattack_warning"}


@dataclass(frozen=True)
class EvaluateConfig:
    """Mirror of params.yaml `evaluate:`; every field is required (no second defaults)."""
    threats: list[Threat]         # threat models evaluated by the DAG (one job each)
    learned_threats: list[LearnedThreat]  # learned perturbation sets, evaluated by pipeline.evaluate_latent
    eps_255: dict[Threat, float]  # radius per threat, in 1/255 pixel units (paper: linf 8, l2 128)
    n_eval: int                   # first n test images attacked (paper: 10000)
    batch_size: int               # images per attack batch (memory only)
    chunk_size: int               # images per resumable AutoAttack call
    version: Literal["standard"]  # AutoAttack version
    pgd_steps: int                # steps of the PGD baseline (step 2.5 eps / steps)
    sweep_factors: list[float]    # multiples of eps of the masking sweep
    n_sweep: int                  # first n test images of the sweep
    tolerance: float              # accuracy slack (fraction) before a check fires
    max_pgd_gap: float            # PGD minus AutoAttack accuracy that flags masking
    checkpoint: CheckpointKind    # best (validation-selected, the references') or last: which model.pt is attacked


@dataclass
class Evaluation:
    """Per-example results (index order of the test set) and the summary the JSON reports."""
    index: np.ndarray             # test-set indices attacked
    label: np.ndarray
    clean_pred: np.ndarray
    pgd_correct: np.ndarray       # bool: survived PGD-`pgd_steps`
    aa_pred: np.ndarray           # prediction on AutoAttack's output (the clean image if it survived)
    aa_correct: np.ndarray        # bool: survived AutoAttack
    max_perturbation: float       # largest threat-norm of AutoAttack's perturbations
    autoattack_warnings: list[str] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)
    chunks_reused: int = 0

    @property
    def clean_correct(self) -> np.ndarray:
        return self.clean_pred == self.label

    def accuracies(self) -> dict[str, float]:
        return {"clean_acc": float(self.clean_correct.mean()), "pgd_acc": float(self.pgd_correct.mean()),
                "autoattack_acc": float(self.aa_correct.mean())}


def eps_value(cfg: EvaluateConfig, threat: Threat) -> float:
    """Radius in [0, 1] pixel units from the 1/255 value in params (parsed in this one place)."""
    return cfg.eps_255[threat] / 255.0


def autoattack_seed(seed: int) -> int:
    """The explicit AutoAttack seed (it would default to the clock), derived from base.seed."""
    return seeding.derive(seed, "evaluate", "autoattack") % (1 << 31)


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat) -> float:
    delta = (x_adv - x).flatten(1)
    if not len(delta):
        return 0.0
    return float((delta.abs().amax(1) if threat == "linf" else delta.norm(dim=1)).max())


class _Collect(logging.Handler):
    """Keeps AutoAttack's warnings (its sanity checks log them) for the flags."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def autoattack_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, eps: float,
                     cfg: EvaluateConfig, seed: int, state_path: Path, device: torch.device
                     ) -> tuple[torch.Tensor, list[str]]:
    """Run AutoAttack on one chunk; return its adversarial images and the package's warnings."""
    from pyautoattack import AutoAttack  # imported here: the package is heavy and only this stage needs it

    state_path.unlink(missing_ok=True)  # pyautoattack 0.2.0 cannot restore its state (module docstring)
    collect = _Collect()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(collect)
    try:
        with attacks.eval_mode(model), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adversary = AutoAttack(model, norm=NORMS[threat], eps=eps, version=cfg.version, seed=seed,
                                   device=device)
            x_adv = adversary.run_standard_evaluation(x, y, batch_size=cfg.batch_size, state_path=state_path)[0]
    finally:
        aa_logger.removeHandler(collect)
    messages = collect.messages + [str(w.message) for w in caught if "pyautoattack" in (w.filename or "")]
    return x_adv.detach().cpu(), messages


def fingerprint(model_sha256: str, test_sha256: str, threat: Threat, cfg: EvaluateConfig, seed: int,
                start: int, stop: int) -> str:
    """Everything that decides a chunk's per-example results; a chunk file with another is redone."""
    from pyautoattack import __version__ as aa_version
    return json.dumps({"model_sha256": model_sha256, "test_sha256": test_sha256, "threat": threat,
                       "eps_255": cfg.eps_255[threat], "seed": seed, "version": cfg.version,
                       "batch_size": cfg.batch_size, "pgd_steps": cfg.pgd_steps, "start": start,
                       "stop": stop, "pyautoattack": aa_version}, sort_keys=True)


def _load_chunk(path: Path, expected: str) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        if read_attrs(path).get("fingerprint") != expected:
            log.warning("%s: made with other settings or model; attacking this chunk again", path)
            return None
        return read_arrays(path)
    except ShardError as error:
        log.warning("%s: unreadable (%s); attacking this chunk again", path, error)
        return None


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, threat: Threat, cfg: EvaluateConfig,
             seed: int, workdir: Path, device: torch.device, model_sha256: str, test_sha256: str) -> Evaluation:
    """Attack the first n_eval images chunk by chunk (resuming from --workdir), then run the eps sweep."""
    n = min(cfg.n_eval, len(images))
    if n < cfg.n_eval:
        log.warning("evaluate.n_eval is %d but the test set has %d images: evaluating %d", cfg.n_eval,
                    len(images), n)
    eps = eps_value(cfg, threat)
    aa_seed = autoattack_seed(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    parts: list[dict[str, np.ndarray]] = []
    aa_warnings: list[str] = []
    reused = 0
    bar = tqdm(total=n, desc=f"evaluate {threat}", unit="img", mininterval=5)
    for start in range(0, n, cfg.chunk_size):
        stop = min(start + cfg.chunk_size, n)
        path = workdir / f"chunk-{start:06d}.h5"
        stamp = fingerprint(model_sha256, test_sha256, threat, cfg, seed, start, stop)
        chunk = _load_chunk(path, stamp)
        if chunk is None:
            x, y = to_float(images[start:stop]), torch.from_numpy(labels[start:stop].astype(np.int64))
            clean_pred = predict_labels(model, x, cfg.batch_size, device)
            _, pgd_mask = attacks.robust_accuracy(model, x.to(device), y.to(device), threat, eps,
                                                  cfg.pgd_steps, cfg.batch_size,
                                                  seed=seeding.derive(seed, "evaluate", "pgd", start))
            x_adv, messages = autoattack_chunk(model, x, y, threat, eps, cfg, aa_seed,
                                               workdir / f"chunk-{start:06d}.autoattack.json", device)
            aa_pred = predict_labels(model, x_adv, cfg.batch_size, device)
            chunk = {"index": np.arange(start, stop, dtype=np.int64), "label": y.numpy(),
                     "clean_pred": clean_pred.astype(np.int64), "pgd_correct": pgd_mask.cpu().numpy(),
                     "aa_pred": aa_pred.astype(np.int64),
                     "max_perturbation": np.array([perturbation_norm(x_adv, x, threat)])}
            write_arrays(path, chunk, {"fingerprint": stamp, "autoattack_warnings": json.dumps(messages)})
        else:
            reused += 1
            log.info("%s: finished earlier, not attacked again", path.name)
        aa_warnings += json.loads(read_attrs(path).get("autoattack_warnings", "[]"))
        parts.append(chunk)
        bar.update(stop - start)
    bar.close()
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}
    result = Evaluation(index=merged["index"], label=merged["label"], clean_pred=merged["clean_pred"],
                        pgd_correct=merged["pgd_correct"].astype(bool), aa_pred=merged["aa_pred"],
                        aa_correct=merged["aa_pred"] == merged["label"],
                        max_perturbation=float(merged["max_perturbation"].max()),
                        autoattack_warnings=sorted(set(aa_warnings)), chunks_reused=reused)
    result.sweep = eps_sweep(model, images, labels, threat, cfg, seed, device)
    return result


def eps_sweep(model: nn.Module, images: np.ndarray, labels: np.ndarray, threat: Threat, cfg: EvaluateConfig,
              seed: int, device: torch.device) -> dict[str, Any]:
    """PGD accuracy on the first n_sweep images at each multiple of eps (should fall as eps grows)."""
    n = min(cfg.n_sweep, len(images))
    x = to_float(images[:n]).to(device)
    y = torch.from_numpy(labels[:n].astype(np.int64)).to(device)
    accs = []
    for factor in tqdm(cfg.sweep_factors, desc="eps sweep", unit="eps", mininterval=5):
        acc, _ = attacks.robust_accuracy(model, x, y, threat, factor * eps_value(cfg, threat), cfg.pgd_steps,
                                         cfg.batch_size, seed=seeding.derive(seed, "evaluate", "sweep"))
        accs.append(acc)
    return {"factor": list(cfg.sweep_factors),
            "eps_255": [f * cfg.eps_255[threat] for f in cfg.sweep_factors], "pgd_acc": accs, "n": n}


def sanity_flags(acc: dict[str, float], sweep: dict[str, Any], cfg: EvaluateConfig, eps: float,
                 max_perturbation: float, aa_warnings: list[str]) -> dict[str, str]:
    """Name -> reason for every check that fired (empty: the evaluation looks sound)."""
    tol, flags = cfg.tolerance, {}
    clean, pgd, aa = acc["clean_acc"], acc["pgd_acc"], acc["autoattack_acc"]
    if aa > pgd + tol:
        flags["autoattack_above_pgd"] = f"AutoAttack accuracy {aa:.4f} above PGD accuracy {pgd:.4f}"
    if max(pgd, aa) > clean + tol:
        flags["robust_above_clean"] = f"robust accuracy {max(pgd, aa):.4f} above clean accuracy {clean:.4f}"
    if pgd - aa > cfg.max_pgd_gap:
        flags["pgd_far_above_autoattack"] = (
            f"PGD accuracy {pgd:.4f} exceeds AutoAttack's {aa:.4f} by more than max_pgd_gap "
            f"{cfg.max_pgd_gap} (gradient attacks miss what AutoAttack finds)")
    accs, eps_list = sweep.get("pgd_acc", []), sweep.get("eps_255", [])
    rises = [f"{eps_list[i]:g}->{eps_list[i + 1]:g}/255: {accs[i]:.4f}->{accs[i + 1]:.4f}"
             for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + tol]
    if rises:
        flags["sweep_not_decreasing"] = "robust accuracy rises with eps (" + "; ".join(rises) + ")"
    elif accs and accs[0] > tol and accs[-1] > SWEEP_KEEP * accs[0]:
        flags["sweep_not_decreasing"] = (
            f"robust accuracy barely falls from eps {eps_list[0]:g}/255 ({accs[0]:.4f}) to "
            f"{eps_list[-1]:g}/255 ({accs[-1]:.4f}): more than {SWEEP_KEEP:.0%} survives")
    if max_perturbation > eps * (1 + 1e-4) + 1e-6:
        flags["perturbation_exceeds_eps"] = f"AutoAttack perturbation {max_perturbation:.6f} > eps {eps:.6f}"
    if aa_warnings:
        flags["autoattack_warning"] = " | ".join(aa_warnings)
    return flags


def summary(result: Evaluation, cfg: EvaluateConfig, threat: Threat, run: str, seed: int,
            model_path: Path, model_sha256: str, model_name: str, test_path: Path, test_sha256: str,
            examples_path: Path | None) -> dict[str, Any]:
    """The JSON the table reads (metric names equal table columns)."""
    from pyautoattack import __version__ as aa_version

    acc = result.accuracies()
    eps = eps_value(cfg, threat)
    flags = sanity_flags(acc, result.sweep, cfg, eps, result.max_perturbation, result.autoattack_warnings)
    return {
        "run": run, "threat": threat, "eps_255": cfg.eps_255[threat], "eps": eps, "norm": NORMS[threat],
        "n_eval": int(len(result.index)), **acc, "pgd_steps": cfg.pgd_steps,
        "attack": {"package": "pyautoattack", "package_version": aa_version, "version": cfg.version,
                   "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
                   "seed": autoattack_seed(seed),
                   "batch_size": cfg.batch_size, "chunk_size": cfg.chunk_size},
        "seed": seed, "max_perturbation": result.max_perturbation,
        "sweep": result.sweep,
        "flags": sorted(flags), "flag_reasons": flags,
        "gradient_masking_suspected": bool(MASKING_FLAGS & set(flags)),
        "model": model_name, "model_path": str(model_path), "model_sha256": model_sha256,
        "test_path": str(test_path), "test_sha256": test_sha256,
        "examples_path": str(examples_path) if examples_path else "",
        "config": dataclasses.asdict(cfg),
    }


def write_examples(path: Path, result: Evaluation, attrs: dict[str, Any]) -> str:
    """Per-example results, for point-by-point comparison of runs (atomic, checksummed)."""
    return write_arrays(path, {"index": result.index, "label": result.label, "clean_pred": result.clean_pred,
                               "clean_correct": result.clean_correct, "pgd_correct": result.pgd_correct,
                               "aa_pred": result.aa_pred, "aa_correct": result.aa_correct}, attrs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True, help="robust model checkpoint (models.save_checkpoint)")
    parser.add_argument("--test", type=Path, required=True, help="test image set (HDF5)")
    parser.add_argument("--threat", choices=sorted(NORMS), required=True)
    parser.add_argument("--workdir", type=Path, required=True, help="resumable chunk results (not an output)")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON")
    parser.add_argument("--out-examples", type=Path, required=True, help="per-example results (HDF5)")
    parser.add_argument("--run", help="run name in the JSON (default: the model's folder name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # per-attack progress lines into the log
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(EvaluateConfig, cfg_all["evaluate"])
    seed, device = cfg_all["base"]["seed"], models.resolve_device(cfg_all["base"]["device"])
    run = args.run or args.model.parent.name
    model_sha256 = file_sha256(args.model)
    try:  # the robust model must be the architecture train_robust.model names (a stale file is not)
        variant = params_mod.split_run(run)[1]   # a variant may train another architecture
        section = params_mod.train_robust_for(cfg_all, run) if variant in cfg_all["variants"]["names"] \
            else cfg_all["train_robust"]
        model = models.load_checkpoint(args.model, device, expected=section["model"])
        kind = models.checkpoint_kind(args.model, expected=cfg.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    model_name = section["model"]   # load_checkpoint refused a file holding any other architecture
    images, labels = read_imageset(args.test, verify=True)
    test_sha256 = read_attrs(args.test)["sha256"]
    log.info("run %s, %s eps %g/255, model %s (sha256 %s), device %s", run, args.threat,
             cfg.eps_255[args.threat], model_name, model_sha256[:12], device)
    result = evaluate(model, images, labels, args.threat, cfg, seed, args.workdir, device, model_sha256,
                      test_sha256)
    report = summary(result, cfg, args.threat, run, seed, args.model, model_sha256, model_name, args.test,
                     test_sha256, args.out_examples)
    report.update(kind)
    write_examples(args.out_examples, result, {"run": run, "threat": args.threat,
                                               "eps_255": cfg.eps_255[args.threat],
                                               "model_sha256": model_sha256, "test_sha256": test_sha256})
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    log.info("clean %.4f  PGD-%d %.4f  AutoAttack %.4f on %d images", report["clean_acc"], cfg.pgd_steps,
             report["pgd_acc"], report["autoattack_acc"], report["n_eval"])
    for name, reason in report["flag_reasons"].items():
        log.warning("sanity check %s: %s", name, reason)
    if report["gradient_masking_suspected"]:
        log.warning("gradient masking suspected: treat the robust accuracy of run %s as an upper bound", run)
    if result.chunks_reused:
        log.info("%d chunk(s) reused from %s", result.chunks_reused, args.workdir)


if __name__ == "__main__":
    main()
