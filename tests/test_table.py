"""Results table: every column, one row per (run, threat), provenance that points at real files."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import evaluate as E
from pipeline import models, paper_reference
from pipeline import params as P
from pipeline import table as T
from pipeline.inference import to_float
from pipeline.shards import file_sha256, read_arrays, read_attrs, read_imageset, write_imageset
from tests.helpers import REPO, tiny_overrides


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, cifar_sets):
    """A miniature results tree: two runs (baseline, gaussian), each really evaluated (AutoAttack on
    8 images of an untrained small CNN at a radius it cannot survive, so the attack stays cheap)."""
    root = tmp_path_factory.mktemp("project")
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg = P.deep_merge(default, tiny_overrides())
    cfg["evaluate"].update(n_eval=8, chunk_size=8, batch_size=8, n_sweep=8)
    cfg["evaluate"]["eps_255"]["linf"] = 32.0
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(P.validate(cfg)))
    images, labels = read_imageset(cifar_sets["train"])
    train_x, train_y = to_float(images), torch.from_numpy(labels)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_imageset(root / "data" / "generated" / "gaussian" / f"shard-{i:05d}.h5",
                       rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 5))
    for run, seed in [("baseline", 0), ("gaussian", 1)]:
        torch.manual_seed(seed)
        model = root / "models" / "robust" / run / "model.pt"
        # a few SGD steps: an untrained CNN predicts one class whatever the input, so its "correct"
        # points survive every attack (slow, and rightly flagged); trained, every point breaks at once
        net = models.build("small_cnn")
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for idx in torch.randperm(len(train_y))[:640].split(64):
            loss = torch.nn.functional.cross_entropy(net(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.save_checkpoint(model, net.eval(), "small_cnn", 10)
        out = root / "results" / "evaluate" / run
        E.main(["--params", str(params), "--run", run, "--model", str(model), "--test", str(cifar_sets["test"]),
                "--threat", "linf", "--workdir", str(root / "work" / run), "--out", str(out / "linf.json"),
                "--out-examples", str(out / "linf.h5")])
        metrics = {"run": run, "generator": None if run == "baseline" else run,
                   "n_generated": 0 if run == "baseline" else 10, "cutmix_alpha": 0.0, "model": "small_cnn",
                   "loss": "trades", "threat": "linf", "eps_255": 8.0, "epochs": 2, "model_sha256": file_sha256(model)}
        path = root / "results" / "train_robust" / run / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(metrics))
    (root / "results" / "analysis").mkdir(parents=True)
    (root / "results" / "analysis" / "gaussian.json").write_text(json.dumps(
        {"generator": "gaussian", "complementarity": {"train": 0.4, "test": 0.45, "self": 0.1},
         "coverage": {"train": 0.2, "test": 0.25},
         "quality": {"feature_space": "teacher", "generated": {"fid": 12.5}, "reference_test": {"fid": 0.75}}}))
    (root / "results" / "teacher").mkdir(parents=True)
    (root / "results" / "teacher" / "metrics.json").write_text(json.dumps({"test_acc": 0.61}))
    return root


@pytest.fixture
def project(evaluated, tmp_path):
    """A private copy per test (tests edit the metrics); evaluation JSONs keep naming the real files."""
    root = tmp_path / "project"
    shutil.copytree(evaluated, root)
    return {"root": root, "params": root / "params.yaml",
            "shards": sorted((root / "data" / "generated" / "gaussian").glob("shard-*.h5"))}


def table_args(project, **override):
    root = project["root"] / "results"
    args = {"--evaluations": [root / "evaluate"], "--train-metrics": [root / "train_robust"],
            "--teacher-metrics": [root / "teacher" / "metrics.json"], "--analysis": [root / "analysis"],
            "--generated": [project["root"] / "data" / "generated"],
            "--out": [root / "cifar10_table.csv"], "--out-md": [root / "cifar10_table.md"],
            "--out-figure": [root / "figures" / "cifar10_robust_vs_generated.png"], **override}
    argv = ["--params", str(project["params"])]
    for flag, values in args.items():
        argv += [flag, *map(str, values)]
    return argv


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_table_has_every_column_and_traceable_rows(project, monkeypatch):
    monkeypatch.chdir(REPO)  # inside the repository: git_commit is filled
    T.main(table_args(project))
    root = project["root"] / "results"
    rows = read_rows(root / "cifar10_table.csv")
    assert list(rows[0]) == T.COLUMNS
    required_columns = {"dataset", "generator", "n_generated", "model", "threat", "eps", "clean_acc",
                     "autoattack_acc", "pgd_acc", "pgd_steps", "teacher_acc", "complementarity_train",
                     "complementarity_test", "complementarity_self", "coverage_train", "coverage_test",
                     "epochs", "n_eval", "flags", "git_commit", "params_sha256", "model_sha256",
                     "generated_sha256"}
    assert required_columns <= set(rows[0])
    assert [(r["run"], r["threat"]) for r in rows] == [("baseline", "linf"), ("gaussian", "linf")]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for row in rows:
        evaluation = json.loads(Path(row["evaluation_path"]).read_text())
        # every number comes from the evaluation file the row names, on the model the row names
        assert float(row["autoattack_acc"]) == pytest.approx(evaluation["autoattack_acc"], abs=5e-5)
        assert row["model_sha256"] == file_sha256(Path(row["model_path"]))
        examples = read_arrays(Path(row["examples_path"]))
        assert float(row["autoattack_acc"]) == pytest.approx(examples["aa_correct"].mean(), abs=5e-5)
        assert float(row["clean_acc"]) == pytest.approx(examples["clean_correct"].mean(), abs=5e-5)
        assert 0 <= float(row["autoattack_acc"]) <= float(row["clean_acc"]) <= 1
        assert row["eps"] == "32/255" and row["n_eval"] == "8" and row["teacher_acc"] == "0.6100"
        assert row["params_sha256"] == T.params_sha256(T.params_mod.load(project["params"]))
        assert row["git_commit"].split("-")[0] == head
    baseline, gaussian = rows
    assert baseline["generator"] == "none" and baseline["generated_sha256"] == ""
    assert baseline["complementarity_test"] == "" and baseline["coverage_test"] == ""
    sums = sorted(read_attrs(path)["sha256"] for path in project["shards"])
    assert gaussian["generated_sha256"] == hashlib.sha256("\n".join(sums).encode()).hexdigest()
    assert gaussian["complementarity_test"] == "0.4500" and gaussian["coverage_train"] == "0.2000"
    assert gaussian["n_generated"] == "10"
    assert (gaussian["fid"], gaussian["fid_reference"], gaussian["fid_feature_space"]) == ("12.5", "0.75", "teacher")
    assert baseline["fid"] == baseline["fid_feature_space"] == ""
    md = (root / "cifar10_table.md").read_text()
    assert "gaussian" in md and "NOT our measurements" in md
    # the FID column names its feature space, and the note gives the real test set's FID as the reference
    assert "| FID (teacher features) |" in md and "| 12.5 |" in md
    assert "NOT the standard Inception FID" in md and "real test set scores 0.75" in md
    assert (root / "figures" / "cifar10_robust_vs_generated.png").read_bytes()[:4] == b"\x89PNG"


def test_explicit_file_lists_give_the_same_table(project, tmp_path):
    T.main(table_args(project))
    root = project["root"] / "results"
    by_dirs = read_rows(root / "cifar10_table.csv")
    listed = table_args(project, **{
        "--evaluations": sorted((root / "evaluate").glob("*/*.json")),
        "--train-metrics": sorted((root / "train_robust").glob("*/metrics.json")),
        "--analysis": [root / "analysis" / "gaussian.json"],
        "--generated": project["shards"], "--out": [tmp_path / "listed.csv"]})
    T.main(listed)
    assert read_rows(tmp_path / "listed.csv") == by_dirs


def test_missing_key_names_the_file(project):
    metrics = project["root"] / "results" / "train_robust" / "gaussian" / "metrics.json"
    data = json.loads(metrics.read_text())
    del data["n_generated"]
    metrics.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"gaussian/metrics.json: required key 'n_generated'"):
        T.main(table_args(project))


def test_stale_evaluation_and_changed_generated_set_are_refused(project):
    metrics = project["root"] / "results" / "train_robust" / "gaussian" / "metrics.json"
    data = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**data, "model_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="stale evaluation"):
        T.main(table_args(project))
    metrics.write_text(json.dumps({**data, "generated_sha256": "f" * 64}))
    with pytest.raises(SystemExit, match="retrain or restore"):
        T.main(table_args(project))
    # without --generated the recorded checksum is used as is
    T.main(table_args(project, **{"--generated": []}))
    rows = read_rows(project["root"] / "results" / "cifar10_table.csv")
    assert rows[1]["generated_sha256"] == "f" * 64


def test_paper_references_are_labelled_and_sourced():
    refs = paper_reference.matching("cifar10", "linf", 8)
    assert refs and all(ref.label.startswith("paper:") and ref.source for ref in refs)
    assert all(0 < ref.autoattack_acc < (ref.clean_acc or 1) < 1 for ref in refs)
    assert paper_reference.matching("svhn") == []


def test_a_learned_threat_row_goes_through_the_cli(project, caplog):
    """A cvae row (latent radius, no AutoAttack value) is written and logged without a formatting error,
    with the training threat of its run in `train_threat`."""
    results = project["root"] / "results"
    linf = json.loads((results / "evaluate" / "baseline" / "linf.json").read_text())
    learned = {**linf, "threat": "cvae", "eps_label": "latent 6.18", "eps_255": None, "autoattack_acc": None,
               "corrupted_acc": 0.3, "latent_acc": 0.2, "pgd_acc": 0.2}
    (results / "evaluate" / "baseline" / "cvae.json").write_text(json.dumps(learned))
    cfg = P.load(project["params"])
    cfg["generate"]["generators"].append("cvae")
    cfg["evaluate"]["learned_threats"] = ["cvae"]   # a cvae row of a params that has none is stale: left out
    project["params"].write_text(yaml.safe_dump(P.validate(cfg)))
    caplog.set_level("INFO", logger="pipeline.table")
    T.main(table_args(project))
    rows = {(r["run"], r["threat"]): r for r in read_rows(results / "cifar10_table.csv")}
    row = rows[("baseline", "cvae")]
    assert row["autoattack_acc"] == "" and float(row["corrupted_acc"]) == 0.3 and row["eps"] == "latent 6.18"
    assert row["train_threat"] == rows[("baseline", "linf")]["train_threat"]
    assert any("baseline cvae: clean" in message for message in caplog.messages)


def test_the_evaluated_checkpoint_is_named_and_checked_against_its_own_file(project):
    """An evaluation of best.pt is checked against the run's best_sha256 (not the last model's), and the
    row and markdown say which checkpoint, from which epoch, was attacked."""
    results = project["root"] / "results"
    evaluation = results / "evaluate" / "baseline" / "linf.json"
    ev = json.loads(evaluation.read_text())
    evaluation.write_text(json.dumps({**ev, "checkpoint": "best", "checkpoint_epoch": 3}))
    metrics = results / "train_robust" / "baseline" / "metrics.json"
    data = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**data, "best_sha256": ev["model_sha256"], "model_sha256": "0" * 64}))
    T.main(table_args(project))
    rows = {r["run"]: r for r in read_rows(results / "cifar10_table.csv")}
    assert (rows["baseline"]["checkpoint"], rows["baseline"]["checkpoint_epoch"]) == ("best", "3")
    assert rows["gaussian"]["checkpoint"] == "last"      # an evaluation that does not say attacked model.pt
    assert "| best (epoch 3) |" in (results / "cifar10_table.md").read_text()
    metrics.write_text(json.dumps({**data, "best_sha256": "1" * 64, "model_sha256": ev["model_sha256"]}))
    with pytest.raises(SystemExit, match="evaluated best model .* stale evaluation"):
        T.main(table_args(project))


def test_published_rows_say_how_they_were_trained_and_pair_only_like_with_like():
    l2 = [ref for ref in paper_reference.matching("cifar10", "l2")]
    assert l2 and all(ref.trained_under == "l2" and "trained l2" in ref.label for ref in l2)
    one_million = [ref for ref in paper_reference.matching("cifar10", "linf") if ref.n_generated == 1_000_000]
    assert [ref.model for ref in one_million] == ["WRN-28-10"] and "DDPM + CutMix" in one_million[0].label
    # a class-balanced DDPM + CutMix run: the selection kept fewer than the 1M images the DDPM sampled
    row = {"run": "ddpm-cutmix", "generator": "ddpm", "model": "wrn-28-10", "train_threat": "linf", "threat": "linf",
           "n_generated": 987_650, "n_sampled": 1_000_000, "cutmix_alpha": 1.0, "clean_acc": 0.85,
           "autoattack_acc": 0.6, "n_eval": 10_000}
    refs = paper_reference.matching("cifar10")
    assert T.comparable_refs(row, refs) == one_million          # the 1M row, never the 100M ones
    # Rebuffi et al.'s 1M row is DDPM samples with CutMix: not a Gaussian, an EDM, or a run without CutMix
    for other in ({"generator": "gaussian"}, {"generator": "edm"}, {"cutmix_alpha": 0.0}):
        assert T.comparable_refs({**row, **other}, refs) == [], other
    # our Linf-trained model evaluated under L2 has no published counterpart (the 78.31% is L2-trained)
    assert T.comparable_refs({**row, "threat": "l2"}, refs) == []
    lines = T.comparisons([{**row, "threat": "l2", "n_sampled": 2000}], refs)
    assert "not a gap to close" in lines[0]
    assert "trained linf" in "\n".join(T.comparisons([row], refs))


def test_fid_column_names_inception_when_the_analysis_used_it():
    rows = [{"fid_feature_space": "inception", "fid": 3.1, "fid_reference": 2.2},
            {"fid_feature_space": "", "fid": "", "fid_reference": ""}]
    assert T.fid_header(rows) == "FID (Inception)"
    assert "the standard FID" in T.fid_note(rows)[1] and "scores 2.2 " in T.fid_note(rows)[1]
    assert T.fid_header(rows[1:]) == "FID" and T.fid_note(rows[1:]) == []


def test_a_stale_runs_evaluation_left_in_the_folder_never_joins(project):
    """DVC hands the table whole folders: the files of a run params no longer defines are left out."""
    results = project["root"] / "results"
    for folder in ("evaluate", "train_robust"):
        shutil.copytree(results / folder / "baseline", results / folder / "dropped")
    stale = results / "evaluate" / "dropped" / "linf.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "run": "dropped"}))
    T.main(table_args(project))
    assert sorted(r["run"] for r in read_rows(results / "cifar10_table.csv")) == ["baseline", "gaussian"]
