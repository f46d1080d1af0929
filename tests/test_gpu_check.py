"""bench/gpu_check.py runs end to end at its CPU setting (labelled "cpu") and writes its JSON and table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, env


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
    assert (report["edm"] == "measured") == any(variant.startswith("EDM") for _, variant in rows)
    table = (tmp_path / "gpu_check-cpu.md").read_text()
    assert table.startswith("# gpu_check (cpu)") and "| train | ours, compile |" in table
