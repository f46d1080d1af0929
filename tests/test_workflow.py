"""Workflow tests: the whole DAG at test scale through Snakemake, then through `dvc repro`.

The DAG runs in a copy of the workflow files with params.yaml = configs/default.yaml + tests/params.yaml.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import yaml

from pipeline import params as P
from tests.helpers import BIN, make_workdir, read_table, run, save_params

pytestmark = pytest.mark.slow


def test_snakemake_builds_a_sane_table(snakemake_run):
    cfg = P.load(snakemake_run / "params.yaml")
    rows = read_table(snakemake_run / "results" / "cifar10_table.csv")
    expected_columns = {"dataset", "generator", "n_generated", "model", "threat", "eps", "clean_acc",
                        "autoattack_acc", "teacher_acc"}
    assert expected_columns <= set(rows[0])
    assert {row["generator"] for row in rows} == {"none", *P.generators(cfg)} or \
        {row["generator"] for row in rows} == {"", *P.generators(cfg)}
    assert len(rows) == len(P.runs(cfg)) * len(cfg["evaluate"]["threats"])
    # every variant (tests/params.yaml: cutmix) adds a row for the baseline and each generator
    assert {row["variant"] for row in rows} == {"none", *cfg["variants"]["names"]}
    assert {(row["generator"], row["variant"]) for row in rows} == {
        (generator, variant) for generator in ["none", *P.generators(cfg)]
        for variant in ["none", *cfg["variants"]["names"]]}
    for row in rows:
        clean, robust, teacher = float(row["clean_acc"]), float(row["autoattack_acc"]), float(row["teacher_acc"])
        assert 0.0 <= robust <= clean <= 1.0
        assert teacher > 0.1  # a real classifier on real CIFAR-10 beats chance even at test scale
        assert row["dataset"] == "cifar10"
    shard_dir = snakemake_run / "data" / "generated" / P.generators(cfg)[0]
    assert len(list(shard_dir.glob("shard-*.h5"))) == P.shard_count(cfg)
    assert (snakemake_run / "results" / "complementarity.csv").exists()


def test_snakemake_rerun_has_nothing_to_do(snakemake_run):
    result = run([str(BIN / "snakemake"), "-n", "results/cifar10_table.csv"], snakemake_run)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_dvc_repro_gives_the_same_table(snakemake_run, dvc_repo):
    ours = read_table(dvc_repo / "results" / "cifar10_table.csv")
    theirs = read_table(snakemake_run / "results" / "cifar10_table.csv")
    key = lambda row: (row["run"], row["threat"])
    measured = ["clean_acc", "autoattack_acc", "pgd_acc", "teacher_acc", "n_generated", "model", "eps"]
    assert [[row[c] for c in measured] for row in sorted(ours, key=key)] == \
        [[row[c] for c in measured] for row in sorted(theirs, key=key)]
    status = run([str(BIN / "dvc"), "status"], dvc_repo)
    assert "up to date" in status.stdout.lower()


def test_dvc_table_lists_exactly_the_runs_params_defines(dvc_repo, tmp_path):
    """DVC hands the table the results folders: a stale run's files left there (its run since dropped from
    params) change the folder, so the table stage reruns, and its rows stay the runs params defines."""
    repo = tmp_path / "dvc"
    shutil.copytree(dvc_repo, repo, symlinks=True)
    cfg = P.load(repo / "params.yaml")
    for folder in ("results/evaluate", "results/train_robust"):
        shutil.copytree(repo / folder / "baseline", repo / folder / "dropped")
    stale = repo / "results/evaluate/dropped/linf.json"
    stale.write_text(stale.read_text().replace('"run": "baseline"', '"run": "dropped"'))
    done = run([str(BIN / "dvc"), "repro", "table"], repo).stdout
    assert "table" in ran_stages(done), done[-3000:]
    rows = read_table(repo / "results" / "cifar10_table.csv")
    assert sorted({row["run"] for row in rows}) == sorted(P.runs(cfg))


def test_adding_a_threat_or_variant_reruns_only_the_new_jobs(snakemake_run, tmp_path):
    """Axes of the DAG (threats, variants, generators) are not settings of the jobs already done: adding
    l2 plans only the l2 evaluations (and the table), never the finished linf AutoAttack or training
    jobs; adding a generator samples only its own shards."""
    copy = tmp_path / "copy"
    shutil.copytree(snakemake_run, copy, symlinks=True)   # copy2 keeps mtimes; .snakemake keeps params
    cfg = yaml.safe_load((copy / "params.yaml").read_text())
    cfg["evaluate"]["threats"] = ["linf", "l2"]
    cfg["variants"]["names"] = [*cfg["variants"]["names"], "source_bn"]
    (copy / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    plan = run([str(BIN / "snakemake"), "-n", "results/cifar10_table.csv"], copy).stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.split("Job stats:")[1].split("Reasons")[0], flags=re.M))
    runs, new_runs = len(P.runs(cfg)), 1 + len(P.generators(cfg))   # baseline-source_bn, <generator>-source_bn
    # l2 for every run, linf only for the new variant's runs
    assert int(jobs["evaluate"]) == runs + new_runs, plan[-3000:]
    assert int(jobs["evaluate_chunk"]) == (runs + new_runs) * P.eval_chunk_count(cfg["evaluate"]), jobs
    assert int(jobs["train_robust"]) == new_runs and jobs.get("teacher") is None and jobs.get("generate") is None, \
        jobs

    cfg["generate"]["generators"] = [*cfg["generate"]["generators"], "cvae"]   # a new generator: its shards only
    (copy / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    plan = run([str(BIN / "snakemake"), "-n", "results/cifar10_table.csv"], copy).stdout
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.split("Job stats:")[1].split("Reasons")[0], flags=re.M))
    assert int(jobs["generate"]) == P.shard_count(cfg) and jobs.get("teacher") is None, jobs


def planned_jobs(plan: str) -> dict[str, int]:
    """Job counts of a `snakemake -n` plan."""
    counts = re.findall(r"^(\w+)\s+(\d+)$", plan.split("Job stats:")[1].split("Reasons")[0], flags=re.M)
    return {name: int(n) for name, n in counts}


def test_select_feeds_training_and_best_is_evaluated(snakemake_run):
    """The paper's filter runs (one select job per generator) and every run of that generator trains on
    its index; evaluation attacks best.pt, the validation-selected model."""
    cfg = P.load(snakemake_run / "params.yaml")
    for generator in P.generators(cfg):
        index = np.load(snakemake_run / "data" / "selection" / generator / "index.npy")
        metrics = yaml.safe_load((snakemake_run / "results/train_robust" / generator / "metrics.json").read_text())
        assert metrics["n_generated"] == len(index) < cfg["generate"]["n_images"]   # trained on the selection
    rows = read_table(snakemake_run / "results" / "cifar10_table.csv")
    assert {row["checkpoint"] for row in rows} == {"best"}
    evaluation = yaml.safe_load((snakemake_run / "results/evaluate/baseline/linf.json").read_text())
    assert evaluation["model_path"].endswith("models/robust/baseline/best.pt")


def test_changing_select_reruns_select_and_that_generators_runs_only(snakemake_run, dvc_repo, tmp_path):
    """select params are settings of the select jobs and, through the index, of the training runs of
    each generator: changing them reruns those and nothing upstream, nor the real-data baseline."""
    copy = tmp_path / "snakemake"
    shutil.copytree(snakemake_run, copy, symlinks=True)
    cfg = yaml.safe_load((copy / "params.yaml").read_text())
    cfg["select"]["top_fraction"] = 0.75     # another index
    (copy / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    dry = run([str(BIN / "snakemake"), "-n", "-p", "results/cifar10_table.csv"], copy)
    jobs = planned_jobs(dry.stdout)
    generator_runs = [r.name for r in P.run_table(cfg) if r.generator is not None]
    assert jobs["select"] == len(P.generators(cfg)), jobs
    assert jobs["train_robust"] == len(generator_runs), jobs
    assert jobs["evaluate"] == len(generator_runs) * len(cfg["evaluate"]["threats"]), jobs
    assert not {"teacher", "generate", "pseudolabel", "analysis", "data"} & set(jobs), jobs
    assert f"--selection data/selection/{P.generators(cfg)[0]}/index.npy" in dry.stdout

    repo = tmp_path / "dvc"
    shutil.copytree(dvc_repo, repo, symlinks=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(P.validate(
        P.deep_merge(yaml.safe_load((repo / "params.yaml").read_text()), {"select": {"top_fraction": 0.75}}))))
    generator = P.generators(cfg)[0]
    done = run([str(BIN / "dvc"), "repro", f"train_robust@{generator}", "train_robust@baseline"], repo).stdout
    assert ran_stages(done) - {"check_params"} == {f"select@{generator}", f"train_robust@{generator}"}, done[-3000:]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_retraining_the_cvae_reruns_only_runs_trained_in_its_set(tmp_path):
    """threat cvae through both tools: the threat_model files carry the CVAE dependency, so retraining
    the CVAE reruns the latent_at run (and its latent evaluation) but never the norm-ball baseline."""
    workdir = make_workdir(tmp_path / "latent")
    cfg = yaml.safe_load((workdir / "params.yaml").read_text())
    cfg["generate"]["generators"] = ["cvae"]
    cfg["train_generator"]["cvae"].update(train_steps=10, checkpoint_every=10, holdout=50, latent_steps=2)
    cfg["variants"]["names"] = ["latent_at"]
    cfg["evaluate"]["learned_threats"] = ["cvae"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    targets = ["models/robust/baseline/last.pt", "results/evaluate/baseline-latent_at/cvae.json"]
    run([str(BIN / "snakemake"), "--cores", "2", *targets], workdir)
    metrics = yaml.safe_load((workdir / "results/train_robust/baseline-latent_at/metrics.json").read_text())
    assert metrics["threat"] == "cvae" and metrics["latent_radius"] > 0
    assert yaml.safe_load((workdir / "models/threat/baseline.json").read_text()) == \
        {"run": "baseline", "threat": "linf"}

    cfg["train_generator"]["cvae"]["train_steps"] = 12
    (workdir / "params.yaml").write_text(yaml.safe_dump(P.validate(cfg)))
    dry = run([str(BIN / "snakemake"), "-n", *targets], workdir)
    plan = dry.stdout + dry.stderr
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.split("Job stats:")[1].split("Reasons")[0], flags=re.M))
    assert jobs.get("train_robust") == "1" and jobs.get("threat_model") == "1", plan[-3000:]
    assert "models/robust/baseline-latent_at/last.pt" in plan   # the one training job; the linf baseline is not

    run(["git", "init", "-q"], workdir)   # the DVC config came with the workflow files
    cfg["train_generator"]["cvae"]["train_steps"] = 10
    save_params(workdir, cfg)
    first = run([str(BIN / "dvc"), "repro", "train_robust@baseline", "train_robust@baseline-latent_at"],
                workdir).stdout
    assert {"threat_model", "train_robust@baseline", "train_robust@baseline-latent_at"} <= ran_stages(first)
    cfg["train_generator"]["cvae"]["train_steps"] = 12
    save_params(workdir, cfg)
    second = run([str(BIN / "dvc"), "repro", "train_robust@baseline", "train_robust@baseline-latent_at"],
                 workdir).stdout
    assert ran_stages(second) - {"check_params"} == {
        "train_generator@cvae", "threat_model", "train_robust@baseline-latent_at"}, second[-3000:]
