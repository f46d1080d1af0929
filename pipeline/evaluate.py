"""Stage `evaluate`: clean, PGD and AutoAttack accuracy of one robust model under one threat model.

    python -m pipeline.evaluate --params params.yaml --model models/robust/{run}/best.pt \\
        --test data/cifar10/test.h5 --threat linf --workdir work/evaluate/{run}/linf \\
        --out results/evaluate/{run}/linf.json --out-examples results/evaluate/{run}/linf.h5

runs the whole evaluation in one process. The DAG splits it into jobs that write the same two files,
byte for byte (the one-process run goes through the same chunk files and the same merge):

    python -m pipeline.evaluate chunk [same --params --model --test --threat] --chunk K \\
        --workdir work/evaluate/{run}/linf --out-dir results/evaluate/{run}/linf/chunks   # GPU, per chunk
    python -m pipeline.evaluate sweep [same] --out results/evaluate/{run}/linf/sweep.h5     # GPU, once
    python -m pipeline.evaluate merge [same] --chunk-dir results/evaluate/{run}/linf/chunks \\
        --sweep results/evaluate/{run}/linf/sweep.h5 --out ...linf.json --out-examples ...linf.h5   # local

Attacks the first `evaluate.n_eval` test images with AutoAttack (the maintained `pyautoattack`
package, version "standard": APGD-CE, APGD-T, FAB-T, Square; never re-implemented here) and with the
project's one PGD (`pipeline.attacks`), at `evaluate.eps_255[threat]` / 255. `evaluate.version: apgd-ce`
runs AutoAttack's first attack alone (its "custom" version, with the standard version's one restart): many
times cheaper, and an upper bound on the standard version's robust accuracy, image by image. The JSON's
`attack.attacks` names what produced `autoattack_acc`.

Chunks: the images are cut into ceil(n_eval / chunk_size) chunks of `chunk_size` (pipeline/eval_chunks.py
says which images each holds and how the merge checks them). A chunk's per-example results (clean
prediction, PGD, AutoAttack) go atomically to `--workdir/chunk-KKKKK.h5`, stamped with a fingerprint of
everything that decides them (model, test set, threat, eps, seeds, attack settings); `chunk` copies the
file to `--out-dir`. A rerun keeps matching chunks and attacks only the rest, so a killed evaluation
redoes at most one chunk and ends with the same per-example results as an uninterrupted one.
AutoAttack's own `state_path` file is written per chunk in the workdir (it is the package's progress
record: attacks run, surviving points), but pyautoattack 0.2.0 cannot restore from it (it saves the
attack set as a string, so `from_disk` raises "different set of attacks", and its restore branch leaves
`y_adv` undefined); an unfinished chunk is therefore restarted from scratch, which is deterministic
because every attack reseeds from the explicit seed.

Sanity checks (RobustBench style, in the JSON and the log) flag results that look like gradient
masking: AutoAttack accuracy above PGD accuracy, robust above clean accuracy, PGD far above AutoAttack
(gradients too weak to find what the black-box Square attack finds), robust accuracy that does not fall
as eps grows (PGD on the first `n_sweep` images at `sweep_factors` x eps), perturbations outside the
eps-ball, and AutoAttack's own warnings (zero gradients, Square beats the gradient attacks, randomness).
The eps sweep runs once per (run, threat), in its own job: its settings rerun no AutoAttack chunk, and
its numbers do not depend on the chunking.

`--zoo-architecture DMWideResNet|DMPreActResNet` makes `--model` a RobustBench model-zoo file (a local
copy, never downloaded), mapped onto our model (pipeline/robustbench.py); the JSON then says
`"source": "robustbench_zoo"` with the architecture, and `model_sha256` is the zoo file's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import attacks, models, robustbench, seeding
from pipeline import params as params_mod
from pipeline.attacks import Threat
from pipeline.config import AutoAttackVersion, EvaluateConfig
from pipeline.eval_chunks import (
    SWEEP_NAME,
    chunk_name,
    chunk_range,
    concatenate,
    copy_file,
    read_checked,
    reusable,
)
from pipeline.inference import predict_labels, to_float
from pipeline.models import CheckpointKind
from pipeline.shards import atomic_path, count, file_sha256, read_attrs, read_imageset, write_arrays

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("pipeline.evaluate")
NORMS: dict[Threat, str] = {"linf": "Linf", "l2": "L2"}  # our threat names -> AutoAttack's
# Flags that point at gradient masking (the others say the evaluation itself is broken).
# Heuristic: against an adversarially trained model a working attack removes most of the accuracy
# left at the smallest sweep eps by the largest (robust-accuracy-vs-eps curves fall steeply past the
# training eps); keeping more than this share means the attack does not use the larger budget.
SWEEP_KEEP = 0.5
MASKING_FLAGS = {"autoattack_above_pgd", "robust_above_clean", "pgd_far_above_autoattack",
                 "sweep_not_decreasing", "autoattack_warning"}
C = TypeVar("C", bound="DataclassInstance")
ATTACKS: dict[str, tuple[str, ...]] = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd-ce": ("apgd-ce",)}


@dataclass(frozen=True)
class ChunkConfig:
    """The `evaluate:` keys a chunk job reads (pipeline/dag.py declares these): the checkpoint it attacks
    and what decides its per-example results. Not n_eval, which only says how many chunks exist."""
    checkpoint: CheckpointKind
    eps_255: dict[Threat, float]
    batch_size: int
    chunk_size: int
    version: AutoAttackVersion
    pgd_steps: int


@dataclass(frozen=True)
class SweepConfig:
    """The `evaluate:` keys the eps-sweep job reads."""
    checkpoint: CheckpointKind
    eps_255: dict[Threat, float]
    batch_size: int
    pgd_steps: int
    sweep_factors: list[float]
    n_sweep: int


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


def subset(cfg_type: type[C], values: Mapping[str, Any] | EvaluateConfig) -> C:
    """The fields of `cfg_type` taken from the evaluate section (or a whole EvaluateConfig): a chunk or
    sweep job reads only these keys, so the others (n_eval, the check thresholds) rerun none of them."""
    source = dataclasses.asdict(values) if isinstance(values, EvaluateConfig) else values
    return cfg_type(**{item.name: copy.deepcopy(source[item.name]) for item in dataclasses.fields(cfg_type)})


def chunk_count(cfg: EvaluateConfig) -> int:
    return params_mod.eval_chunk_count(dataclasses.asdict(cfg))


def eps_value(cfg: EvaluateConfig | ChunkConfig | SweepConfig, threat: Threat) -> float:
    """Radius in [0, 1] pixel units from the 1/255 value in params (parsed in this one place)."""
    return cfg.eps_255[threat] / 255.0


def autoattack_seed(seed: int) -> int:
    """The explicit AutoAttack seed (it would default to the clock), derived from base.seed."""
    return seeding.derive(seed, "evaluate", "autoattack") % (1 << 31)


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat) -> np.ndarray:
    """Threat-norm of each example's perturbation (float32), so the merge's maximum is over kept examples."""
    delta = (x_adv - x).flatten(1)
    return (delta.abs().amax(1) if threat == "linf" else delta.norm(dim=1)).numpy().astype(np.float32)


class _Collect(logging.Handler):
    """Keeps AutoAttack's warnings (its sanity checks log them) for the flags."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def autoattack_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, eps: float,
                     cfg: ChunkConfig, seed: int, state_path: Path, device: torch.device
                     ) -> tuple[torch.Tensor, list[str]]:
    """Run AutoAttack on one chunk; return its adversarial images and the package's warnings."""
    state_path.unlink(missing_ok=True)  # pyautoattack 0.2.0 cannot restore its state (module docstring)
    collect = _Collect()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(collect)
    try:
        with attacks.eval_mode(model), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adversary = autoattack(model, threat, eps, cfg.version, seed, device)
            x_adv = adversary.run_standard_evaluation(x, y, batch_size=cfg.batch_size, state_path=state_path)[0]
    finally:
        aa_logger.removeHandler(collect)
    messages = collect.messages + [str(w.message) for w in caught if "pyautoattack" in (w.filename or "")]
    return x_adv.detach().cpu(), messages


def autoattack(model: nn.Module, threat: Threat, eps: float, version: AutoAttackVersion, seed: int,
               device: torch.device) -> Any:
    """The package's adversary: its standard version, or APGD-CE alone as its "custom" version with the
    standard version's setting of that attack (one restart for Linf and L2; auto-attack's README)."""
    from pyautoattack import AutoAttack

    if version == "standard":
        return AutoAttack(model, norm=NORMS[threat], eps=eps, version="standard", seed=seed, device=device)
    adversary = AutoAttack(model, norm=NORMS[threat], eps=eps, version="custom", attacks=list(ATTACKS[version]),
                           seed=seed, device=device)
    adversary.apgd.n_restarts = 1
    return adversary


def fingerprint(model_sha256: str, test_sha256: str, threat: Threat, cfg: ChunkConfig | EvaluateConfig, seed: int,
                start: int, stop: int) -> str:
    """Everything that decides a chunk's per-example results; a chunk file with another is redone."""
    from pyautoattack import __version__ as aa_version
    return json.dumps({"model_sha256": model_sha256, "test_sha256": test_sha256, "threat": threat,
                       "eps_255": cfg.eps_255[threat], "seed": seed, "version": cfg.version,
                       "batch_size": cfg.batch_size, "pgd_steps": cfg.pgd_steps, "start": start,
                       "stop": stop, "pyautoattack": aa_version}, sort_keys=True)


def sweep_fingerprint(model_sha256: str, test_sha256: str, threat: Threat, cfg: SweepConfig, seed: int,
                      n: int) -> str:
    """Everything that decides the eps sweep's accuracies."""
    return json.dumps({"model_sha256": model_sha256, "test_sha256": test_sha256, "threat": threat,
                       "eps_255": cfg.eps_255[threat], "seed": seed, "batch_size": cfg.batch_size,
                       "pgd_steps": cfg.pgd_steps, "sweep_factors": list(cfg.sweep_factors), "n": n},
                      sort_keys=True)


def _empty_chunk() -> dict[str, np.ndarray]:
    """A chunk past the end of the test set (n_eval larger than the set): no images."""
    ints = np.zeros(0, dtype=np.int64)
    return {"index": ints, "label": ints, "clean_pred": ints, "pgd_correct": np.zeros(0, dtype=bool),
            "aa_pred": ints, "aa_perturbation": np.zeros(0, dtype=np.float32)}


def _attack(model: nn.Module, images: np.ndarray, labels: np.ndarray, threat: Threat, cfg: ChunkConfig,
            seed: int, start: int, stop: int, state_path: Path, device: torch.device
            ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Clean prediction, PGD and AutoAttack per example of test images [start, stop)."""
    if stop <= start:
        return _empty_chunk(), []
    eps = eps_value(cfg, threat)
    x, y = to_float(images[start:stop]), torch.from_numpy(labels[start:stop].astype(np.int64))
    clean_pred = predict_labels(model, x, cfg.batch_size, device)
    _, pgd_mask = attacks.robust_accuracy(model, x.to(device), y.to(device), threat, eps, cfg.pgd_steps,
                                          cfg.batch_size, seed=seeding.derive(seed, "evaluate", "pgd", start))
    x_adv, messages = autoattack_chunk(model, x, y, threat, eps, cfg, autoattack_seed(seed), state_path, device)
    aa_pred = predict_labels(model, x_adv, cfg.batch_size, device)
    return {"index": np.arange(start, stop, dtype=np.int64), "label": y.numpy(),
            "clean_pred": clean_pred.astype(np.int64), "pgd_correct": pgd_mask.cpu().numpy(),
            "aa_pred": aa_pred.astype(np.int64), "aa_perturbation": perturbation_norms(x_adv, x, threat)}, messages


def attack_chunks(model: nn.Module, images: np.ndarray, labels: np.ndarray, threat: Threat, cfg: ChunkConfig,
                  seed: int, indices: Iterable[int], workdir: Path, device: torch.device, model_sha256: str,
                  test_sha256: str) -> int:
    """Write each chunk's per-example results to workdir/chunk-KKKKK.h5, keeping the chunks a file with
    the same fingerprint already holds (resume); return how many were kept."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    indices = list(indices)
    reused = 0
    bar = tqdm(total=len(indices), desc=f"evaluate {threat}", unit="chunk", mininterval=5)
    for index in indices:
        start, stop = chunk_range(index, cfg.chunk_size, len(images))
        path = workdir / chunk_name(index)
        stamp = fingerprint(model_sha256, test_sha256, threat, cfg, seed, start, stop)
        if reusable(path, stamp) is not None:
            reused += 1
            log.info("%s: finished earlier, not attacked again", path.name)
        else:
            state = workdir / f"chunk-{index:05d}.autoattack.json"
            chunk, messages = _attack(model, images, labels, threat, cfg, seed, start, stop, state, device)
            write_arrays(path, chunk, {"fingerprint": stamp, "autoattack_warnings": json.dumps(messages)})
        bar.update(1)
    bar.close()
    return reused


def eps_sweep(model: nn.Module, images: np.ndarray, labels: np.ndarray, threat: Threat,
              cfg: SweepConfig | EvaluateConfig, seed: int, device: torch.device) -> list[float]:
    """PGD accuracy on the first n_sweep images at each multiple of eps (should fall as eps grows)."""
    n = min(cfg.n_sweep, len(images))
    x = to_float(images[:n]).to(device)
    y = torch.from_numpy(labels[:n].astype(np.int64)).to(device)
    accs = []
    model = model.to(device).eval()
    for factor in tqdm(cfg.sweep_factors, desc="eps sweep", unit="eps", mininterval=5):
        acc, _ = attacks.robust_accuracy(model, x, y, threat, factor * eps_value(cfg, threat), cfg.pgd_steps,
                                         cfg.batch_size, seed=seeding.derive(seed, "evaluate", "sweep"))
        accs.append(acc)
    return accs


def write_sweep(path: Path, accs: list[float], cfg: SweepConfig, threat: Threat, seed: int, n_test: int,
                model_sha256: str, test_sha256: str) -> None:
    stamp = sweep_fingerprint(model_sha256, test_sha256, threat, cfg, seed, min(cfg.n_sweep, n_test))
    write_arrays(path, {"pgd_acc": np.asarray(accs, dtype=np.float64)}, {"fingerprint": stamp})


def merge(chunk_dir: Path, sweep_path: Path, cfg: EvaluateConfig, threat: Threat, seed: int, n_test: int,
          model_sha256: str, test_sha256: str) -> Evaluation:
    """The evaluation of the first n_eval images from the chunk files in `chunk_dir` and the sweep file,
    each checked against the fingerprint these settings, model and test set give (ChunkError if not)."""
    n = min(cfg.n_eval, n_test)
    if n < cfg.n_eval:
        log.warning("evaluate.n_eval is %d but the test set has %d images: evaluating %d", cfg.n_eval, n_test, n)
    total = chunk_count(cfg)
    if total * cfg.chunk_size > cfg.n_eval:
        log.info("the last chunk attacks %d image(s) past evaluate.n_eval (chunks do not depend on it); a "
                 "multiple of evaluate.chunk_size wastes none", total * cfg.chunk_size - cfg.n_eval)
    attack_cfg = subset(ChunkConfig, cfg)
    parts, aa_warnings = [], []
    for index in range(total):
        start, stop = chunk_range(index, cfg.chunk_size, n_test)
        stamp = fingerprint(model_sha256, test_sha256, threat, attack_cfg, seed, start, stop)
        arrays, attrs = read_checked(chunk_dir / chunk_name(index), stamp,
                                     f"chunk {index} of {total}, test images {start}..{stop - 1}")
        parts.append(arrays)
        aa_warnings += json.loads(attrs.get("autoattack_warnings", "[]"))
    merged = concatenate(parts, n, chunk_dir)
    sweep_cfg = subset(SweepConfig, cfg)
    n_sweep = min(cfg.n_sweep, n_test)
    sweep, _ = read_checked(sweep_path, sweep_fingerprint(model_sha256, test_sha256, threat, sweep_cfg, seed,
                                                          n_sweep), "eps sweep")
    return Evaluation(index=merged["index"], label=merged["label"], clean_pred=merged["clean_pred"],
                      pgd_correct=merged["pgd_correct"].astype(bool), aa_pred=merged["aa_pred"],
                      aa_correct=merged["aa_pred"] == merged["label"],
                      max_perturbation=float(merged["aa_perturbation"].max()) if n else 0.0,
                      autoattack_warnings=sorted(set(aa_warnings)),
                      sweep=sweep_summary(cfg, threat, [float(acc) for acc in sweep["pgd_acc"]], n_sweep))


def sweep_summary(cfg: EvaluateConfig, threat: Threat, accs: list[float], n: int) -> dict[str, Any]:
    return {"factor": list(cfg.sweep_factors), "eps_255": [f * cfg.eps_255[threat] for f in cfg.sweep_factors],
            "pgd_acc": accs, "n": n}


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, threat: Threat, cfg: EvaluateConfig,
             seed: int, workdir: Path, device: torch.device, model_sha256: str, test_sha256: str) -> Evaluation:
    """The whole evaluation in one process: every chunk (resuming from `workdir`), the eps sweep, then the
    merge the DAG's merge job runs, on the same files."""
    reused = attack_chunks(model, images, labels, threat, subset(ChunkConfig, cfg), seed, range(chunk_count(cfg)),
                           workdir, device, model_sha256, test_sha256)
    sweep_cfg = subset(SweepConfig, cfg)
    accs = eps_sweep(model, images, labels, threat, sweep_cfg, seed, device)
    write_sweep(workdir / SWEEP_NAME, accs, sweep_cfg, threat, seed, len(images), model_sha256, test_sha256)
    result = merge(workdir, workdir / SWEEP_NAME, cfg, threat, seed, len(images), model_sha256, test_sha256)
    result.chunks_reused = reused
    return result


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
                   "attacks": list(ATTACKS[cfg.version]),
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


# --- the command line: one process, or the DAG's chunk, sweep and merge jobs ---


def model_name_for(cfg_all: dict[str, Any], run: str) -> str:
    """The architecture the run trained (train_robust.model, its variant's own if it sets one); a model of
    no run params defines (evaluated by hand) is expected to be train_robust.model."""
    if run not in params_mod.runs(cfg_all):
        return str(cfg_all["train_robust"]["model"])
    return str(params_mod.train_robust_for(cfg_all, run)["model"])


def load_model(args: argparse.Namespace, cfg_all: dict[str, Any], checkpoint: CheckpointKind,
               device: torch.device) -> tuple[nn.Module, str, dict[str, Any]]:
    """The robust model, its architecture name and which checkpoint it is; one `error:` line for a file
    of another architecture (a stale file) or another checkpoint than evaluate.checkpoint."""
    if args.zoo_architecture:
        try:
            model, arch, _ = robustbench.load_zoo_file(args.model, args.zoo_architecture)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        return model.to(device).eval(), arch.robustgen_model, zoo_kind(arch)
    model_name = model_name_for(cfg_all, args.run)
    try:
        model = models.load_checkpoint(args.model, device, expected=model_name)
        return model, model_name, models.checkpoint_kind(args.model, expected=checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def zoo_kind(arch: robustbench.ZooArchitecture) -> dict[str, Any]:
    """What the JSON says of a zoo model in place of the run's checkpoint kind."""
    return {"checkpoint": "zoo", "checkpoint_epoch": None, "source": "robustbench_zoo",
            "zoo_architecture": arch.label}


def _test_set(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    images, labels = read_imageset(path, verify=True)
    return images, labels, str(read_attrs(path)["sha256"])


def finish(result: Evaluation, cfg: EvaluateConfig, args: argparse.Namespace, seed: int, model_sha256: str,
           model_name: str, kind: dict[str, Any], test_sha256: str) -> None:
    """Write the per-example HDF5 and the JSON (atomically), and log the accuracies and flags."""
    report = summary(result, cfg, args.threat, args.run, seed, args.model, model_sha256, model_name, args.test,
                     test_sha256, args.out_examples)
    report.update(kind)
    write_examples(args.out_examples, result, {"run": args.run, "threat": args.threat,
                                               "eps_255": cfg.eps_255[args.threat],
                                               "model_sha256": model_sha256, "test_sha256": test_sha256})
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    log.info("clean %.4f  PGD-%d %.4f  AutoAttack %.4f on %d images", report["clean_acc"], cfg.pgd_steps,
             report["pgd_acc"], report["autoattack_acc"], report["n_eval"])
    for name, reason in report["flag_reasons"].items():
        log.warning("sanity check %s: %s", name, reason)
    if report["gradient_masking_suspected"]:
        log.warning("gradient masking suspected: treat the robust accuracy of run %s as an upper bound", args.run)


def run_whole(args: argparse.Namespace, cfg_all: dict[str, Any]) -> None:
    cfg = params_mod.section(EvaluateConfig, cfg_all["evaluate"])
    seed, device = cfg_all["base"]["seed"], models.resolve_device(cfg_all["base"]["device"])
    model_sha256 = file_sha256(args.model)
    model, model_name, kind = load_model(args, cfg_all, cfg.checkpoint, device)
    images, labels, test_sha256 = _test_set(args.test)
    log.info("run %s, %s eps %g/255, model %s (sha256 %s), device %s", args.run, args.threat,
             cfg.eps_255[args.threat], model_name, model_sha256[:12], device)
    result = evaluate(model, images, labels, args.threat, cfg, seed, args.workdir, device, model_sha256,
                      test_sha256)
    finish(result, cfg, args, seed, model_sha256, model_name, kind, test_sha256)
    if result.chunks_reused:
        log.info("%d chunk(s) reused from %s", result.chunks_reused, args.workdir)


def run_chunk(args: argparse.Namespace, cfg_all: dict[str, Any]) -> None:
    """One chunk (a Snakemake job) or every chunk (`--chunk all`, DVC's one stage per run and threat)."""
    section = cfg_all["evaluate"]
    cfg = subset(ChunkConfig, section)
    indices = range(params_mod.eval_chunk_count(section)) if args.chunk == "all" else [int(args.chunk)]
    seed, device = cfg_all["base"]["seed"], models.resolve_device(cfg_all["base"]["device"])
    model_sha256 = file_sha256(args.model)
    model, model_name, _ = load_model(args, cfg_all, cfg.checkpoint, device)
    images, labels, test_sha256 = _test_set(args.test)
    log.info("run %s, %s eps %g/255, model %s (sha256 %s), chunk(s) %s of %d images, device %s", args.run,
             args.threat, cfg.eps_255[args.threat], model_name, model_sha256[:12], args.chunk, cfg.chunk_size,
             device)
    attack_chunks(model, images, labels, args.threat, cfg, seed, indices, args.workdir, device, model_sha256,
                  test_sha256)
    for index in indices:
        copy_file(args.workdir / chunk_name(index), args.out_dir / chunk_name(index))


def run_sweep(args: argparse.Namespace, cfg_all: dict[str, Any]) -> None:
    cfg = subset(SweepConfig, cfg_all["evaluate"])
    seed, device = cfg_all["base"]["seed"], models.resolve_device(cfg_all["base"]["device"])
    model_sha256 = file_sha256(args.model)
    model, _, _ = load_model(args, cfg_all, cfg.checkpoint, device)
    images, labels, test_sha256 = _test_set(args.test)
    accs = eps_sweep(model, images, labels, args.threat, cfg, seed, device)
    write_sweep(args.out, accs, cfg, args.threat, seed, len(images), model_sha256, test_sha256)
    log.info("eps sweep %s/255: PGD-%d accuracy %s", [f * cfg.eps_255[args.threat] for f in cfg.sweep_factors],
             cfg.pgd_steps, [round(acc, 4) for acc in accs])


def run_merge(args: argparse.Namespace, cfg_all: dict[str, Any]) -> None:
    """The chunks and the sweep into the JSON and per-example HDF5 (no attack: seconds on a CPU)."""
    cfg = params_mod.section(EvaluateConfig, cfg_all["evaluate"])
    seed = cfg_all["base"]["seed"]
    try:
        if args.zoo_architecture:
            arch = robustbench.zoo_architecture(args.model, args.zoo_architecture)
            model_name, kind = arch.robustgen_model, zoo_kind(arch)
        else:
            model_name = model_name_for(cfg_all, args.run)
            kind = models.checkpoint_kind(args.model, expected=cfg.checkpoint)
        model_sha256, test_sha256 = file_sha256(args.model), str(read_attrs(args.test)["sha256"])
        result = merge(args.chunk_dir, args.sweep, cfg, args.threat, seed, count(args.test), model_sha256,
                       test_sha256)
    except (FileNotFoundError, ValueError) as error:   # ChunkError, a stale or missing model
        raise SystemExit(f"error: {error}") from None
    finish(result, cfg, args, seed, model_sha256, model_name, kind, test_sha256)


COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], None]] = {
    "whole": run_whole, "chunk": run_chunk, "sweep": run_sweep, "merge": run_merge}


def _chunk_arg(text: str) -> str:
    if text != "all" and not (text.isdigit()):
        raise argparse.ArgumentTypeError(f"--chunk: {text!r} is neither a chunk index (0, 1, ...) nor 'all'")
    return text


def parser_for(command: str) -> argparse.ArgumentParser:
    prog = "python -m pipeline.evaluate" + ("" if command == "whole" else f" {command}")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True, help="robust model checkpoint (models.save_checkpoint)")
    parser.add_argument("--test", type=Path, required=True, help="test image set (HDF5)")
    parser.add_argument("--threat", choices=sorted(NORMS), required=True)
    parser.add_argument("--run", required=True, help="run name in the JSON (the DAG's {run}; never read from a path)")
    parser.add_argument("--zoo-architecture", choices=robustbench.ARCHITECTURES,
                        help="--model is a RobustBench model-zoo file of this architecture (pipeline/robustbench.py)")
    add = parser.add_argument
    if command in ("whole", "chunk"):
        add("--workdir", type=Path, required=True, help="resumable chunk results (not an output)")
    if command == "chunk":
        add("--chunk", type=_chunk_arg, required=True, help="chunk index, or all (every chunk of n_eval)")
        add("--out-dir", type=Path, required=True, help="folder of the chunk-KKKKK.h5 outputs")
    if command == "sweep":
        add("--out", type=Path, required=True, help="eps-sweep accuracies (HDF5)")
    if command == "merge":
        add("--chunk-dir", type=Path, required=True, help="folder of the chunk jobs' chunk-KKKKK.h5")
        add("--sweep", type=Path, required=True, help="the sweep job's HDF5")
    if command in ("whole", "merge"):
        add("--out", type=Path, required=True, help="summary JSON")
        add("--out-examples", type=Path, required=True, help="per-example results (HDF5)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv[:1] and argv[0] in COMMANDS and argv[0] != "whole" else "whole"
    args = parser_for(command).parse_args(argv if command == "whole" else argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # per-attack progress lines into the log
    COMMANDS[command](args, params_mod.load(args.params))


if __name__ == "__main__":
    main()
