"""bench/gpu_check.py runs end to end at its CPU setting (labelled "cpu") and writes its JSON and table."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from pipeline import params as P
from tests.helpers import REPO, TEST_DAG, env


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_setting(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--skip-dag",
                           "--out", str(tmp_path)], env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check-cpu.json").read_text())
    assert report["label"] == "cpu" and report["scale"]["model"] == "small_cnn" and "dag" not in report
    rows = {(row["part"], row["variant"]): row for row in report["parts"]}
    assert {"port (fp32)", "ours, eager", "ours, compile"} <= {variant for part, variant in rows if part == "train"}
    assert {part for part, _ in rows} >= {"train", "sampling", "autoattack"}
    assert all(row["images_per_s"] > 0 and row["peak_gib"] is None for row in rows.values())
    assert rows[("train", "port (fp32)")]["vs_port"] == 1.0
    assert 0 <= rows[("autoattack", "standard, Linf 8/255")]["survived"] <= 1
    assert any(part == "sampling" and variant.startswith("EDM Heun") for part, variant in rows)
    table = (tmp_path / "gpu_check-cpu.md").read_text()
    assert table.startswith("# gpu_check (cpu)") and "| train | ours, compile |" in table


def test_the_dag_part_checks_every_run_and_threat_of_the_table(tiny_params, tmp_path):
    """Part 1's verdict on a DAG table: accepted with one sane row per (run, threat), refused with a row
    missing or an AutoAttack accuracy above the clean one."""
    gpu_check = load_gpu_check()
    cfg = P.validate(P.deep_merge(tiny_params, TEST_DAG))
    rows = [{"run": run, "threat": threat, "clean_acc": "0.5", "autoattack_acc": "0.25"}
            for run in P.runs(cfg) for threat in cfg["evaluate"]["threats"]]
    path = tmp_path / "table.csv"
    for table, ok in ((rows, True), (rows[1:], False),
                      ([{**rows[0], "autoattack_acc": "0.75"}, *rows[1:]], False)):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(table)
        assert gpu_check.table_check(path, cfg)["table_ok"] is ok


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
