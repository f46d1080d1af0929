"""The effect summary (pipeline/effect.py) on small result folders written here: known means, intervals,
seed-paired differences and McNemar p-values; column names from the attacks; incomparable runs refused."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from pipeline import effect
from pipeline.shards import write_arrays

N = 200
STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]


def write_run(root: Path, name: str, generator: str | None, amount: int, seed: int, robust: int, clean: int = 120,
              pgd: int | None = None, attacks: list[str] | None = None, n: int = N, variant: str | None = None) -> None:
    """A run whose first `clean` test images are right, first `robust` survive AutoAttack (and `pgd` PGD)."""
    pgd = robust + 4 if pgd is None else pgd
    index = np.arange(n, dtype=np.int64)
    correct = {key: index < count for key, count in (("clean", clean), ("pgd", pgd), ("aa", robust))}
    run_dir = root / "evaluate" / name
    run_dir.mkdir(parents=True)
    write_arrays(run_dir / "linf.h5", {"index": index, "clean_correct": correct["clean"],
                                       "pgd_correct": correct["pgd"], "aa_correct": correct["aa"]})
    (run_dir / "linf.json").write_text(json.dumps({
        "run": name, "threat": "linf", "eps_255": 8.0, "n_eval": n, "clean_acc": clean / n, "pgd_acc": pgd / n,
        "autoattack_acc": robust / n, "pgd_steps": 40, "test_sha256": "t",
        "attack": {"package": "pyautoattack", "version": "custom", "attacks": attacks or ["apgd-ce"]}}))
    metrics = root / "train_robust" / name / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"run": name, "generator": generator, "n_generated": amount, "seed": seed,
                                   "variant": variant, "source_run": name}))


BASE = {0: 56, 1: 66, 2: 61}   # robust images per seed of the baseline


@pytest.fixture
def results(tmp_path) -> Path:
    for seed, robust in BASE.items():
        write_run(tmp_path, f"baseline-s{seed}", None, 0, seed, robust)
        write_run(tmp_path, f"oracle400-s{seed}", "oracle", 400, seed, robust + 10)   # 10 more each seed
        write_run(tmp_path, f"oracle100-s{seed}", "oracle", 100, seed, robust + seed)  # 0, 1, 2 more
    write_run(tmp_path, "gaussian400-s0", "gaussian", 400, 0, BASE[0] - 2)
    return tmp_path


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path) as handle:
        return {(row["arm"], row["amount"]): row for row in csv.DictReader(handle)}


def test_cli_rows_by_arm_and_amount_with_known_answers(results):
    out, fig = results / "effect" / "summary.csv", results / "figures" / "effect.png"
    effect.main(["--evaluations", str(results / "evaluate"), "--train-metrics", str(results / "train_robust"),
                 "--out-csv", str(out), "--out-figure", str(fig)])
    rows = read_csv(out)
    assert list(rows) == [("none", "0"), ("gaussian", "400"), ("oracle", "100"), ("oracle", "400")]
    header = next(csv.reader(open(out)))
    for name in ("clean_mean", "pgd40_mean", "pgd40_low", "apgdce_mean", "apgdce_high", "robust_diff_low",
                 "robust_diff_high", "clean_diff_mean", "mcnemar_p_max"):
        assert name in header
    base, strong, weak, single = rows[("none", "0")], rows[("oracle", "400")], rows[("oracle", "100")], \
        rows[("gaussian", "400")]
    # mean and t-interval over the three seeds
    accs = np.array([BASE[s] + 10 for s in (0, 1, 2)]) / N
    half = sps.t.ppf(0.975, 2) * accs.std(ddof=1) / math.sqrt(3)
    assert float(strong["apgdce_mean"]) == pytest.approx(accs.mean())
    assert float(strong["apgdce_low"]) == pytest.approx(accs.mean() - half)
    assert float(strong["apgdce_high"]) == pytest.approx(accs.mean() + half)
    assert strong["robust_attack"] == "apgdce" and strong["n_seeds"] == "3" and strong["seeds"] == "0;1;2"
    # seed-paired: +10 images on every seed is a difference of exactly 0.05 with no spread, although the
    # seeds' own accuracies spread by more than that
    assert float(strong["robust_diff_mean"]) == pytest.approx(0.05)
    assert float(strong["robust_diff_low"]) == pytest.approx(0.05) == float(strong["robust_diff_high"])
    assert float(strong["apgdce_low"]) < float(base["apgdce_high"])
    assert float(strong["clean_diff_mean"]) == 0.0
    # differences 0, 1, 2 images: mean 1/200, t-interval around it containing 0
    assert float(weak["robust_diff_mean"]) == pytest.approx(1 / N)
    assert float(weak["robust_diff_low"]) < 0 < float(weak["robust_diff_high"])
    # McNemar on the same images: 10 discordant images all one way, p = 2 / 2**10 on every seed
    assert float(strong["mcnemar_p_min"]) == pytest.approx(2 / 1024) == float(strong["mcnemar_p_max"])
    assert strong["mcnemar_n_significant"] == "3"
    assert float(weak["mcnemar_p_min"]) == pytest.approx(0.5) and weak["mcnemar_p_max"] == "1.0"
    # one seed: a mean, no interval; paired with the baseline's seed 0
    assert single["n_seeds"] == "1" and single["apgdce_low"] == "" and single["robust_diff_low"] == ""
    assert float(single["robust_diff_mean"]) == pytest.approx(-2 / N) and single["n_paired"] == "1"
    assert float(base["robust_diff_mean"]) == 0.0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_key_reads_arm_amount_and_seed():
    key = effect.run_key({"generator": None, "n_generated": 0, "seed": 3, "variant": "cutmix"})
    assert key == effect.RunKey("none-cutmix", 0, 3)
    assert effect.run_key({"generator": "edm", "n_generated": 50, "seed": 1, "variant": None}).arm == "edm"


def test_standard_autoattack_columns_are_named_autoattack(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, f"b{seed}", None, 0, seed, 50, attacks=STANDARD)
    rows, columns = effect.summarise(effect.load_runs(tmp_path / "evaluate", tmp_path / "train_robust", "linf"), "none")
    assert "autoattack_mean" in columns and "apgdce_mean" not in columns and rows[0]["robust_attack"] == "autoattack"


@pytest.mark.parametrize("odd, message", [
    ({"attacks": STANDARD}, r"evaluated under different settings"),
    ({"n": N + 10}, r"evaluated under different settings"),
    ({"name": "baseline-again"}, r"runs .* are both arm none, amount 0, seed 0"),
])
def test_incomparable_or_duplicate_runs_are_refused(results, odd, message):
    name = odd.pop("name", "odd")
    write_run(results, name, None, 0, 0, 50, **odd)
    with pytest.raises(effect.EffectError, match=message):
        effect.summarise(effect.load_runs(results / "evaluate", results / "train_robust", "linf"), "none")


def test_missing_baseline_and_missing_metrics_are_one_error_each(results, tmp_path):
    runs = effect.load_runs(results / "evaluate", results / "train_robust", "linf")
    with pytest.raises(effect.EffectError, match=r"--baseline edm: no such arm \(arms: gaussian, none, oracle\)"):
        effect.summarise(runs, "edm")
    (results / "train_robust" / "gaussian400-s0" / "metrics.json").unlink()
    with pytest.raises(SystemExit, match=r"gaussian400-s0/metrics.json: missing"):
        effect.main(["--evaluations", str(results / "evaluate"), "--train-metrics", str(results / "train_robust"),
                     "--out-csv", str(tmp_path / "x.csv"), "--out-figure", str(tmp_path / "x.png")])
