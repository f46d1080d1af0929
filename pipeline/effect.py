"""Effect summary: per arm and amount of generated data, accuracy over training seeds with 95% intervals,
the seed-paired difference to the baseline, and per-seed McNemar tests on the same test images.

    python -m pipeline.effect --evaluations results/evaluate --train-metrics results/train_robust \\
        --out-csv results/effect/summary.csv --out-figure results/figures/effect.png [--baseline none]

Reads every run's evaluation (`<evaluations>/<run>/<threat>.json` and its per-example `<threat>.h5`) and
training metrics (`<train-metrics>/<run>/metrics.json`). A run belongs to an arm (its generator, `none` for
real data only, with `-<variant>` for a variant run), an amount (the generated images it could draw) and a
seed: `run_key` reads them, the one place to change when the runs table names them otherwise.

Columns (one row per arm and amount, accuracies as fractions of the `n_eval` test images):
- `clean_*`, `pgd<N>_*` (PGD with N steps) and the AutoAttack column named after the attacks that ran:
  `autoattack_*` for the standard version, `apgdce_*` for APGD-CE alone (`robust_attack` repeats the name);
  each as `_mean`, `_low`, `_high`: mean over seeds and the 95% Student-t interval (empty with one seed).
- `clean_diff_*`, `pgd<N>_diff_*`, `robust_diff_*` (the AutoAttack column): the mean over seeds of the
  run's accuracy minus the baseline run's of the same seed, with its 95% t-interval (`n_paired` seeds).
- `mcnemar_*`: the exact McNemar test of each paired seed on the AutoAttack results of the same test images
  (pipeline/stats.py): the smallest and largest p-value over seeds and how many seeds have p < 0.05.
Runs evaluated under different settings (test images, threat, radius, attacks) are refused: their numbers
are not comparable.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline import stats
from pipeline.shards import ShardError, atomic_path, read_arrays

log = logging.getLogger("pipeline.effect")
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
ALPHA = 0.05
ATTACK_LABELS = {"autoattack": "AutoAttack", "apgdce": "APGD-CE"}   # column name -> figure label


class EffectError(ValueError):
    """Missing, inconsistent or incomparable results; the message names the files or runs."""


class RunKey(NamedTuple):
    arm: str       # generator, `none` for the real-data baseline, `-<variant>` appended for a variant run
    amount: int    # generated images the run could draw
    seed: int      # training seed


def run_key(metrics: dict[str, Any]) -> RunKey:
    """Arm, amount and seed of a run from its train_robust metrics.json: the seed is its variants.seeds entry
    (seed_index; files without one trained a single seed each, `seed`)."""
    arm = metrics["generator"] or "none"
    if metrics.get("variant"):
        arm += f"-{metrics['variant']}"
    return RunKey(arm, int(metrics["n_generated"]), int(metrics.get("seed_index", metrics["seed"])))


def attack_name(attacks: Iterable[str]) -> str:
    """The column name of an AutoAttack result: `autoattack` for the standard version, else its attacks."""
    attacks = tuple(attacks)
    return "autoattack" if attacks == STANDARD else "_".join(attack.replace("-", "") for attack in attacks)


@dataclass(frozen=True)
class Run:
    name: str
    key: RunKey
    evaluation: dict[str, Any]
    examples: dict[str, np.ndarray]   # index, clean_correct, pgd_correct, aa_correct

    def setting(self) -> dict[str, Any]:
        """What must be equal for two runs' numbers to be comparable."""
        e = self.evaluation
        return {"threat": e["threat"], "eps_255": e["eps_255"], "n_eval": e["n_eval"], "pgd_steps": e["pgd_steps"],
                "attacks": list(e["attack"]["attacks"]), "test_sha256": e.get("test_sha256")}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EffectError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise EffectError(f"{path}: not valid JSON ({error})") from None


def load_runs(evaluations: Path, train_metrics: Path, threat: str) -> list[Run]:
    """Every run with a `<threat>` evaluation, with its metrics and per-example results."""
    runs = []
    for path in sorted(Path(evaluations).glob(f"*/{threat}.json")):
        name = path.parent.name
        metrics = _read_json(Path(train_metrics) / name / "metrics.json")
        try:
            key = run_key(metrics)
        except KeyError as error:
            raise EffectError(f"{train_metrics}/{name}/metrics.json: no {error} field") from None
        try:
            examples = read_arrays(path.with_suffix(".h5"))
        except ShardError as error:
            raise EffectError(str(error)) from None
        runs.append(Run(name, key, _read_json(path), examples))
    if not runs:
        raise EffectError(f"{evaluations}: no <run>/{threat}.json evaluations")
    return runs


def _check(runs: list[Run]) -> None:
    reference = runs[0]
    for run in runs[1:]:
        if run.setting() != reference.setting():
            raise EffectError(f"runs {reference.name} and {run.name} were evaluated under different settings "
                              f"({reference.setting()} vs {run.setting()}): not comparable")
    seen: dict[RunKey, str] = {}
    for run in runs:
        if run.key in seen:
            raise EffectError(f"runs {seen[run.key]} and {run.name} are both arm {run.key.arm}, amount "
                              f"{run.key.amount}, seed {run.key.seed}")
        seen[run.key] = run.name


def _accuracies(run: Run, robust: str, pgd: str) -> dict[str, float]:
    e = run.evaluation
    return {"clean": float(e["clean_acc"]), pgd: float(e["pgd_acc"]), robust: float(e["autoattack_acc"])}


def _paired_examples(base: Run, run: Run) -> tuple[np.ndarray, np.ndarray]:
    if not np.array_equal(base.examples["index"], run.examples["index"]):
        raise EffectError(f"runs {base.name} and {run.name}: per-example results of different test images")
    return base.examples["aa_correct"].astype(bool), run.examples["aa_correct"].astype(bool)


def summarise(runs: list[Run], baseline: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, columns): one row per arm and amount, sorted by arm (baseline first) then amount."""
    _check(runs)
    setting = runs[0].setting()
    robust, pgd = attack_name(setting["attacks"]), f"pgd{setting['pgd_steps']}"
    groups: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.key.arm, run.key.amount)].append(run)
    base_groups = [key for key in groups if key[0] == baseline]
    if len(base_groups) != 1:
        arms = sorted({arm for arm, _ in groups})
        raise EffectError(f"--baseline {baseline}: " + (f"no such arm (arms: {', '.join(arms)})" if not base_groups
                          else f"has several amounts {sorted(a for _, a in base_groups)}"))
    base_runs = {run.key.seed: run for run in groups[base_groups[0]]}
    base_accs = {seed: _accuracies(run, robust, pgd) for seed, run in base_runs.items()}
    metrics = ("clean", pgd, robust)
    columns = ["arm", "amount", "n_seeds", "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "low", "high")),
               "robust_attack", "n_paired", *(f"{name}_diff_{s}" for name in ("clean", pgd, "robust")
                                              for s in ("mean", "low", "high")),
               "mcnemar_p_min", "mcnemar_p_max", "mcnemar_n_significant", "threat", "eps_255", "n_eval", "runs"]
    rows = []
    for (arm, amount) in sorted(groups, key=lambda key: (key[0] != baseline, key[0], key[1])):
        members = sorted(groups[(arm, amount)], key=lambda run: run.key.seed)
        accs = {run.key.seed: _accuracies(run, robust, pgd) for run in members}
        row: dict[str, Any] = {"arm": arm, "amount": amount, "n_seeds": len(members),
                               "seeds": ";".join(str(run.key.seed) for run in members)}
        for metric in metrics:
            mean, low, high, _ = stats.t_interval([acc[metric] for acc in accs.values()])
            row.update({f"{metric}_mean": mean, f"{metric}_low": low, f"{metric}_high": high})
        row["robust_attack"] = robust
        paired = sorted(set(accs) & set(base_accs))
        row["n_paired"] = len(paired)
        for metric, name in (("clean", "clean"), (pgd, pgd), (robust, "robust")):
            diff = stats.paired_difference({s: accs[s][metric] for s in paired},
                                           {s: base_accs[s][metric] for s in paired})
            row.update({f"{name}_diff_mean": diff.mean, f"{name}_diff_low": diff.low, f"{name}_diff_high": diff.high})
        by_seed = {run.key.seed: run for run in members}
        p_values = [stats.mcnemar(*_paired_examples(base_runs[seed], by_seed[seed])).p_value for seed in paired]
        row.update({"mcnemar_p_min": min(p_values, default=math.nan), "mcnemar_p_max": max(p_values, default=math.nan),
                    "mcnemar_n_significant": sum(p < ALPHA for p in p_values),
                    "threat": setting["threat"], "eps_255": setting["eps_255"], "n_eval": setting["n_eval"],
                    "runs": ";".join(run.name for run in members)})
        rows.append(row)
    return rows, columns


def _cell(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row[key]) for key in columns})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _percent(points: list[dict[str, Any]], column: str, stat: str) -> list[float]:
    return [point[f"{column}_{stat}"] * 100 for point in points]


def _bars(points: list[dict[str, Any]], column: str) -> np.ndarray:
    """Error bars (below, above) in points; none with one seed."""
    mean = np.array(_percent(points, column, "mean"))
    low, high = np.array(_percent(points, column, "low")), np.array(_percent(points, column, "high"))
    return np.nan_to_num(np.array([mean - low, high - mean]))


def figure(path: Path, rows: list[dict[str, Any]], baseline: str) -> None:
    """Left: robust accuracy against the number of generated images (symmetric-log x, so 0 shows), one line
    per arm starting from the baseline at 0, bars the 95% intervals over seeds. Right: the same as the
    seed-paired difference to the baseline, whose interval is the one that says whether an arm helps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    robust = rows[0]["robust_attack"]
    base = next(row for row in rows if row["arm"] == baseline)
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    arms = sorted({row["arm"] for row in rows} - {baseline})
    for column, axis in ((robust, ax), ("robust_diff", ax_diff)):
        axis.errorbar([base["amount"]], _percent([base], column, "mean"), yerr=_bars([base], column), fmt="ks",
                      capsize=3, label=f"{baseline} (n={base['n_seeds']})", zorder=3)
        for shift, arm in enumerate(arms):
            points = sorted((row for row in rows if row["arm"] == arm), key=lambda row: row["amount"])
            spread = 1 + 0.03 * (shift - (len(arms) - 1) / 2)   # arms side by side at the same amount
            xs = [base["amount"], *(p["amount"] * spread for p in points)]
            ys = _percent([base, *points], column, "mean")
            line, = axis.plot(xs, ys, "-", alpha=0.6)
            axis.errorbar(xs[1:], ys[1:], yerr=_bars(points, column), fmt="o", capsize=3, color=line.get_color(),
                          label=f"{arm} (n={min(p['n_seeds'] for p in points)})")
        positive = [row["amount"] for row in rows if row["amount"] > 0]
        threshold = min(positive) if positive else 1
        axis.set_xscale("symlog", linthresh=threshold)
        axis.set_xlim(left=-0.3 * threshold)
        axis.set_xlabel("generated images drawn from (0 = real data only)")
        axis.grid(alpha=0.3)
    label = ATTACK_LABELS.get(robust, robust)
    ax.set_ylabel(f"robust accuracy, {label} (%)")
    ax.set_title("mean over seeds, 95% t-interval", fontsize=9)
    ax.legend(fontsize=8)
    ax_diff.axhline(0, color="k", lw=0.8)
    ax_diff.set_ylabel(f"difference to {baseline}, same seed (points)")
    ax_diff.set_title("seed-paired difference, 95% t-interval", fontsize=9)
    fig.suptitle(f"{label}, {base['threat']} eps {base['eps_255']:g}/255, first {base['n_eval']} test images",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.effect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=Path, required=True, help="folder of <run>/<threat>.json and .h5")
    parser.add_argument("--train-metrics", type=Path, required=True, help="folder of <run>/metrics.json")
    parser.add_argument("--threat", default="linf", help="evaluations of this threat (default linf)")
    parser.add_argument("--baseline", default="none", help="arm the differences are taken to (default none)")
    parser.add_argument("--out-csv", type=Path, required=True)
    parser.add_argument("--out-figure", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        rows, columns = summarise(load_runs(args.evaluations, args.train_metrics, args.threat), args.baseline)
    except EffectError as error:
        raise SystemExit(f"error: {error}") from None
    write_csv(args.out_csv, rows, columns)
    figure(args.out_figure, rows, args.baseline)
    log.info("%d arm/amount rows from %d runs -> %s, %s", len(rows), sum(row["n_seeds"] for row in rows),
             args.out_csv, args.out_figure)


if __name__ == "__main__":
    main()
