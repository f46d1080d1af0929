"""The effect study's kept results (pipeline/effect_report.py): collect copies only finished runs with the
commit and params hash, refuses to mix studies, and `write` fills README's section from the copies alone."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import effect_report as report
from pipeline import params as P
from pipeline.provenance import params_sha256
from pipeline.shards import write_arrays
from tests.helpers import REPO, tiny_config
from tests.test_effect import write_run

ROBUST = {0: 56, 1: 66, 2: 61}   # baseline robust images (of 200) per seed; gaussian gets 10 more each seed


@pytest.fixture
def study(tmp_path) -> Path:
    """A study checkout: git repo, params with one generator over 3 seeds, every run finished but
    gaussian-s2 (trained, not evaluated), a teacher and a Snakemake benchmark."""
    workdir = tmp_path / "study"
    workdir.mkdir()
    cfg = tiny_config()
    cfg["generate"]["generators"] = ["gaussian"]
    cfg["variants"].update(names=[], seeds=[0, 1, 2])
    (workdir / "params.yaml").write_text(yaml.safe_dump(cfg))
    for command in (["init", "-q"], ["add", "params.yaml"],
                    ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study"]):
        subprocess.run(["git", "-C", str(workdir), *command], check=True)
    results = workdir / "results"
    for seed, robust in ROBUST.items():
        suffix = f"-s{seed}" if seed else ""
        write_run(results, f"baseline{suffix}", None, 0, seed, robust)
        write_run(results, f"gaussian{suffix}", "gaussian", 2000, seed, robust + 10)
        for run in (f"baseline{suffix}", f"gaussian{suffix}"):
            (workdir / "models" / "robust" / run).mkdir(parents=True)
            (workdir / "models" / "robust" / run / "best.pt").write_bytes(run.encode())
    for name in ("linf.json", "linf.h5"):
        (results / "evaluate" / "gaussian-s2" / name).unlink()
    (results / "teacher").mkdir()
    (results / "teacher" / "metrics.json").write_text(json.dumps({"test_acc": 0.41}))
    (workdir / "benchmarks" / "train_robust").mkdir(parents=True)
    benchmark = workdir / "benchmarks" / "train_robust" / "baseline.tsv"
    benchmark.write_text("s\th:m:s\tcpu_time\n5400.0\t1:30:00\t3600.0\n")
    (workdir / ".snakemake" / "log").mkdir(parents=True)   # a generate job (no benchmark) of 3 min, one unfinished
    (workdir / ".snakemake" / "log" / "2026-12-01T100000.snakemake.log").write_text(
        "Select jobs to execute...\n[Tue Dec  1 10:00:00 2026]\nJob 7: generate shard 0\nReason: x\n\n"
        "[Tue Dec  1 10:00:05 2026]\nJob 8: generate shard 1\n[Tue Dec  1 10:03:00 2026]\n"
        "Finished jobid: 7 (Rule: generate)\n1 of 2 steps (50%) done\n[Tue Dec  1 10:03:00 2026]\n"
        "Job 9: train run baseline\nShell command: python -m pipeline.train_robust --run baseline "
        "2> logs/train_robust/baseline.log\n[Tue Dec  1 12:03:00 2026]\nFinished jobid: 9 (Rule: train_robust)\n")
    return workdir


def test_collect_copies_finished_runs_with_provenance_and_refuses_another_study(study, tmp_path):
    out = tmp_path / "kept"
    record = report.collect(study, out)
    assert record["n_planned"] == 6 and record["n_collected"] == 5 and "gaussian-s2" not in record["runs_collected"]
    assert record["commit"] == subprocess.run(["git", "-C", str(study), "rev-parse", "HEAD"], capture_output=True,
                                              text=True).stdout.strip()
    assert record["params_sha256"] == params_sha256(P.load(study / "params.yaml")) == \
        params_sha256(P.load(out / "params.yaml"))
    assert record["changed_files"] == []
    assert (out / "evaluate" / "gaussian-s1" / "linf.h5").exists() and not (out / "evaluate" / "gaussian-s2").exists()
    assert not (out / "train_robust" / "gaussian-s2").exists()   # trained but not evaluated: not finished
    assert (out / "benchmarks" / "train_robust" / "baseline.tsv").exists()
    assert (out / "models" / "robust" / "gaussian-s1" / "best.pt").read_bytes() == b"gaussian-s1"
    assert not (out / "models" / "robust" / "gaussian-s2").exists()
    cfg = yaml.safe_load((study / "params.yaml").read_text())
    cfg["base"]["seed"] = 1
    (study / "params.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(report.ReportError, match="move .* away to start another study"):
        report.collect(study, out)


def test_write_fills_the_sections_from_the_kept_results_only(study, tmp_path):
    out = tmp_path / "kept"
    for folder in ("evaluate", "train_robust"):   # the last run finishes
        for path in (study / "results" / folder / "gaussian-s2").iterdir():
            path.unlink()
        (study / "results" / folder / "gaussian-s2").rmdir()
    write_run(study / "results", "gaussian-s2", "gaussian", 2000, 2, ROBUST[2] + 10)
    report.collect(study, out)
    gap = out / "gap" / "gaussian"
    gap.mkdir(parents=True)
    index = np.arange(50)
    write_arrays(gap / "linf.h5", {"index": index, "clean_correct": index < 100, "pgd_correct": index < 40,
                                   "aa_correct": index < 30})   # 30 of 50 where the study's attack left 50
    (gap / "linf.json").write_text("{}")
    doc, readme = tmp_path / "results.md", tmp_path / "README.md"
    doc.write_text(f"# x\n\nbefore\n{report.BEGIN}\nold numbers\n{report.END}\nafter\n")
    readme.write_text(f"# y\n{report.HEADLINE_BEGIN}\nold\n{report.HEADLINE_END}\n")
    rows = report.write(out, tmp_path / "effect.png", readme, doc)
    text = doc.read_text()
    assert "old numbers" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "6 of 6 runs collected" in readme.read_text()
    assert "gaussian (2,000 images): 5.0 [5.0, 5.0] points, above the baseline" in readme.read_text()
    assert (tmp_path / "effect.png").stat().st_size > 0
    with open(out / "summary.csv") as handle:
        summary = {row["arm"]: row for row in csv.DictReader(handle)}
    assert float(summary["gaussian"]["robust_diff_mean"]) == pytest.approx(10 / 200)
    assert [row["arm"] for row in rows] == ["none", "gaussian"]
    assert "| gaussian | 2,000 | 3 |" in text and "above the baseline" in text   # +5 points every seed: CI > 0
    assert "at some amount, interval excluding 0: gaussian. Not found at any amount measured with an interval: " \
        "no arm." in text
    assert "Collected 6 of the 6 planned runs" in text and "teacher's test accuracy 41.0%" in text
    assert "gaussian 60.0 vs 100.0" in text        # standard AutoAttack vs the study's attack, same 50 images
    assert "Cost: 1.05 core-hours, so about 0.5 hours on two idle cores" in text   # 1 h of CPU + 3 min logged
    assert "By rule: generate 0.05, train_robust 1.00." in text
    assert "Its jobs took 1.1 core-hours: about 0.5 hours of a 2-core machine." in readme.read_text()
    with open(out / "jobs.csv", newline="") as handle:   # train_robust: 2 h of wall, 1 h of CPU in its benchmark
        assert list(csv.DictReader(handle)) == [
            {"log": "2026-12-01T100000.snakemake.log", "rule": "generate", "jobid": "7", "job_log": "",
             "start": "2026-12-01T10:00:00", "end": "2026-12-01T10:03:00", "seconds": "180.0"},
            {"log": "2026-12-01T100000.snakemake.log", "rule": "train_robust", "jobid": "9",
             "job_log": "logs/train_robust/baseline.log", "start": "2026-12-01T10:03:00",
             "end": "2026-12-01T12:03:00", "seconds": "7200.0"}]


def test_last_checkpoints_get_their_own_table_once_every_run_has_one(study, tmp_path):
    out = tmp_path / "kept"
    report.collect(study, out)                      # 5 runs collected (gaussian-s2 not evaluated)
    last = tmp_path / "last"
    for seed, robust in ROBUST.items():             # at the end of training gaussian is 2 images below
        suffix = f"-s{seed}" if seed else ""
        write_run(last, f"baseline{suffix}", None, 0, seed, robust)
        if seed < 2:
            write_run(last, f"gaussian{suffix}", "gaussian", 2000, seed, robust - 2)
    for run in ("baseline", "baseline-s1"):         # two copied so far: counted, no table
        shutil.copytree(last / "evaluate" / run, out / "last" / run)
    doc, readme = tmp_path / "results.md", tmp_path / "README.md"
    doc.write_text(f"{report.BEGIN}\n{report.END}\n")
    readme.write_text(f"{report.HEADLINE_BEGIN}\n{report.HEADLINE_END}\n")
    report.write(out, tmp_path / "effect.png", readme, doc)
    assert "Last checkpoints evaluated so far: 2 of the 5 collected runs." in doc.read_text()
    assert not (out / "summary_last.csv").exists()
    for run in ("baseline-s2", "gaussian", "gaussian-s1"):
        shutil.copytree(last / "evaluate" / run, out / "last" / run)
    report.write(out, tmp_path / "effect.png", readme, doc)
    text = doc.read_text()
    study_table, last_table = text.split("every run's last checkpoint")
    assert "above the baseline" in study_table and "| gaussian | 2,000 | 2 |" in last_table
    with open(out / "summary_last.csv") as handle:
        summary = {row["arm"]: row for row in csv.DictReader(handle)}
    assert float(summary["gaussian"]["robust_diff_mean"]) == pytest.approx(-2 / 200)
    assert (out / "summary.csv").read_text() != (out / "summary_last.csv").read_text()


def test_a_readme_without_the_markers_is_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(report.ReportError, match="README.md: no <!-- effect-study:begin -->"):
        report.replace_section(readme, "x")


def test_gap_runs_are_each_arms_seed_zero_model_on_all_its_images():
    cfg = tiny_config()
    cfg["generate"]["generators"] = ["oracle", "gaussian"]
    cfg["variants"].update(names=[], seeds=[0, 1], amounts=[100], amounts_for=["oracle"])
    assert report.gap_runs(cfg) == ["baseline", "oracle", "gaussian"]


def test_targets_are_the_evaluations_not_yet_kept(study, tmp_path):
    out = tmp_path / "kept"
    report.collect(study, out)
    assert report.missing_targets(study, out) == ["results/evaluate/gaussian-s2/linf.json",
                                                  "results/analysis/gaussian.json"]   # its FID


def test_the_study_sections_are_the_ones_generated_from_the_kept_results():
    """docs/results.md's effect section and README's headline are `effect_report write`'s output from the
    committed results/effect/: numbers in them are never typed in."""
    kept = REPO / report.RESULTS
    rows, _ = report.summary(kept)
    for path, begin, end, expected in (
            (report.RESULTS_DOC, report.BEGIN, report.END, report.section(kept, rows)),
            (report.README, report.HEADLINE_BEGIN, report.HEADLINE_END, report.headline(kept, rows))):
        text = (REPO / path).read_text()
        assert text[text.index(begin):text.index(end) + len(end)] == expected, f"{path}: run effect_report write"
