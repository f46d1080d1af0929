"""A miniature of the effect study (configs/effect.yaml) run end to end: the preset's arms (real only, the
oracle pool, the Gaussian fit, EDM trained in the DAG), its data-amount sweep and seed axis, planned by
Snakemake from `effect_report targets`, then standard AutoAttack on the subset, the last checkpoints,
`collect` and `write`, as docs/effect.md describes. Only the sizes are the test's (tests/params.yaml and
MINIATURE below): every choice that makes the study a study (arms, amounts_for, seeds, APGD-CE, one
threat) is the preset's."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pipeline import data
from pipeline import effect_report as report
from pipeline import params as P
from tests.helpers import BIN, DEMO_ARCHIVE, REPO, make_workdir, run, save_params, tiny_overrides

# 300 labelled images (50 of them validation), the other 300 the oracle's pool; 100 generated images per
# generator in 2 shards, the sweep at 50 of them; 2 seeds (the fewest with an interval); 2 epochs of 2
# steps per run; one chunk of 20 test images per run.
MINIATURE = {"data": {"n_labelled": 300},
             "generate": {"n_images": 100, "shard_size": 50},
             "variants": {"names": [], "amounts": [50], "seeds": [0, 1]},
             "train_robust": {"epoch_size": 64, "batch_size": 32},
             "evaluate": {"chunk_size": 20}}
ARMS = {("none", 0), ("oracle", 50), ("oracle", 100), ("gaussian", 50), ("gaussian", 100), ("edm", 100)}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A test-scale checkout of the effect preset after its runs, the AutoAttack subset and the last
    checkpoints' evaluation."""
    workdir = make_workdir(tmp_path_factory.mktemp("effect"))
    cfg = P.deep_merge(P.deep_merge(P.preset("effect"), tiny_overrides()), MINIATURE)
    cfg["data"].update(archive=str(DEMO_ARCHIVE), md5=data.md5sum(DEMO_ARCHIVE))
    save_params(workdir, cfg)
    targets = report.missing_targets(workdir, workdir / "kept")
    # docs/effect.md's command: two one-thread jobs side by side (the profile's one `gpu` would run one)
    run([str(BIN / "snakemake"), *targets, "--cores", "2", "--max-threads", "1", "--resources", "gpu=2"], workdir)
    report.gap(workdir, n_eval=20)
    report.last(workdir)
    return workdir


@pytest.mark.slow
def test_the_preset_keeps_the_studys_design_at_test_scale(study):
    cfg = P.load(study / "params.yaml")
    effect = P.preset("effect")
    assert cfg["variants"]["amounts_for"] == effect["variants"]["amounts_for"]
    assert cfg["generate"]["generators"] == effect["generate"]["generators"]
    assert cfg["evaluate"]["version"] == effect["evaluate"]["version"] == "apgd-ce"
    assert cfg["evaluate"]["threats"] == ["linf"] and len(P.run_table(cfg)) == 12


@pytest.mark.slow
def test_the_study_is_collected_and_its_sections_written_from_the_kept_results(study, tmp_path):
    kept = tmp_path / "kept"
    record = report.collect(study, kept)
    assert record["n_collected"] == record["n_planned"] == 12
    assert report.missing_targets(study, kept) == []          # nothing left to run for this collection
    with open(kept / "jobs.csv", newline="") as handle:       # every job Snakemake ran, from its log
        assert {row["rule"] for row in csv.DictReader(handle)} >= {"data", "teacher", "generate", "train_robust"}
    readme, doc = tmp_path / "README.md", tmp_path / "results.md"
    shutil.copy(REPO / "README.md", readme)
    shutil.copy(REPO / "docs" / "results.md", doc)
    figure = tmp_path / "effect.png"
    rows = report.write(kept, figure, readme, doc)

    assert {(row["arm"], int(row["amount"])) for row in rows} == ARMS
    with open(kept / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert {(row["arm"], int(row["amount"])) for row in summary} == ARMS
    for row in summary:
        assert int(row["n_seeds"]) == 2
        mean = float(row["apgdce_mean"])   # a t-interval over 2 seeds: wide, and not clipped to [0, 1]
        assert 0 <= mean <= 1 and float(row["apgdce_low"]) <= mean <= float(row["apgdce_high"])
        if row["arm"] != "none":   # the seed-paired difference and a McNemar test per seed
            assert float(row["robust_diff_low"]) <= float(row["robust_diff_mean"]) <= float(row["robust_diff_high"])
            assert int(row["n_paired"]) == 2
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gaps = json.loads(next((kept / "gap").glob("*/*.json")).read_text())
    assert gaps["n_eval"] == 20
    section = doc.read_text()
    assert "Collected 12 of the 12 planned runs" in section and "Standard AutoAttack on the first 20" in section
    assert "Generator FID" in section and "core-hours" in section
    assert "every run's last checkpoint" in section and (kept / "summary_last.csv").exists()
    assert "**Effect study**" in readme.read_text()
