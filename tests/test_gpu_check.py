"""bench/gpu_check.py: every part guarded and its result on disk the moment it ends; the device command
runs with only torch and the distributions bench/prepare_device.py prepares; the DAG part's table verdict."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import params as P
from tests.helpers import REPO, TEST_DAG

PYTHON = Path(sys.executable)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_part_that_raises_leaves_the_others_results_each_written_when_it_ended(tmp_path, monkeypatch):
    """train raises, sampling still runs for real (CPU toy scale) after it, and compile, standing in for a
    later part, reads the report on disk when it starts: train's error and sampling's rows are there."""
    gpu_check = load("gpu_check")
    seen = {}

    def broken(scale, device):
        raise RuntimeError("CUDA out of memory (simulated)")

    def probe(scale, device):
        seen.update(json.loads((tmp_path / "out" / "gpu_check-cpu.json").read_text())["parts"])
        return [{"part": "train", "variant": "probe", "images_per_s": 1.0, "peak_gib": None}]

    monkeypatch.setattr(gpu_check, "train_part", broken)
    monkeypatch.setattr(gpu_check, "compile_part", probe)
    code = gpu_check.main(["--device", "cpu", "--parts", "compile,sampling,train", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")])
    assert code == 1
    assert seen["sampling"]["status"] == "ok" and len(seen["sampling"]["rows"]) == 2
    assert seen["train"]["status"] == "error" and "out of memory" in seen["train"]["error"]
    assert seen["compile"]["status"] == "running"
    parts = json.loads((tmp_path / "out" / "gpu_check-cpu.json").read_text())["parts"]
    assert list(parts) == ["train", "sampling", "compile"]   # the fixed order, compile last, whatever --parts says
    assert parts["compile"]["status"] == "ok" and parts["sampling"]["rows"][0]["images_per_s"] > 0
    assert "- train: error (RuntimeError: CUDA out of memory" in (tmp_path / "out" / "gpu_check-cpu.md").read_text()


def isolated_site(dest: Path, distributions: set[str]) -> Path:
    """A folder holding only `distributions` (links to their installed files), as a machine would have them."""
    dest.mkdir(parents=True)
    for name in distributions:
        dist = md.distribution(name)
        for top in {file.parts[0] for file in dist.files or []} - {".."}:
            source = Path(dist.locate_file(top))
            if not top.endswith(".pth") and source.exists() and not (dest / top).exists():
                (dest / top).symlink_to(source)
    return dest


@pytest.mark.slow
def test_the_device_command_runs_every_part_with_only_torch_and_the_prepared_distributions(tmp_path):
    """bench/device_run.sh as on a lent machine whose install step is done: the interpreter sees the
    standard library, torch with what torch requires, and the pinned closure prepare_device writes, nothing
    else (python -S, the environment's site-packages hidden). Every default part succeeds at CPU scale and
    the stages part trained, checkpointed and evaluated a model."""
    prepare = load("prepare_device")
    wheels = tmp_path / "wheels"
    assert prepare.main(["--python", "3.11", "--dry-run", "--dest", str(wheels)]) == 0
    pins = (wheels / "requirements.txt").read_text().split()
    site = isolated_site(tmp_path / "site", {pin.split("==")[0] for pin in pins} | prepare.closure(["torch"]))
    (site / ".complete").touch()
    interpreter = tmp_path / "python"
    interpreter.write_text(f"#!/bin/sh\nexec {PYTHON} -S \"$@\"\n")
    interpreter.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": str(interpreter),
           "DEVICE_SITE": str(site), "DEVICE_WHEELS": str(wheels), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(REPO / "bench" / "device_run.sh"), "--device", "cpu", "--work",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check" / "gpu_check-cpu.json").read_text())
    assert list(report["parts"]) == ["stages", "train", "sampling", "compile"]   # compile last, no DAG
    assert all(entry["status"] == "ok" for entry in report["parts"].values())
    (stages,) = report["parts"]["stages"]["rows"]
    assert stages["checkpoint_ok"] and stages["steps"] == 8 and 0 <= stages["autoattack_acc"] <= stages["clean_acc"]
    variants = {row["variant"] for entry in report["parts"].values() for row in entry["rows"]}
    assert {"port (fp32)", "ours, eager", "ours, compile"} <= variants
    assert any(variant.startswith("EDM Heun") for variant in variants)


def test_preparation_pins_the_closure_without_torch_and_downloads_for_the_target_python(tmp_path, capsys):
    prepare = load("prepare_device")
    assert prepare.main(["--python", "3.12", "--python", "3.10", "--dry-run", "--dest", str(tmp_path)]) == 0
    pins = dict(line.split("==") for line in (tmp_path / "requirements.txt").read_text().split())
    assert set(map(prepare.canonical, prepare.top_level())) <= set(pins)
    assert "torch" not in pins and not any(name.startswith("nvidia") for name in pins)
    assert all(md.version(name) == version for name, version in pins.items())   # what the tests run with
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all("--only-binary=:all:" in c and "--no-deps" in c for c in commands)
    assert "--python-version 3.12" in commands[0] and "--python-version 3.10" in commands[1]
    assert (tmp_path / "python-versions.txt").read_text().split() == ["3.12", "3.10"]


def test_slimming_a_wheel_drops_the_folder_and_keeps_its_record_true(tmp_path):
    prepare = load("prepare_device")
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as handle:
        handle.writestr("pkg/__init__.py", "x = 1\n")
        handle.writestr("pkg/examples/model.pt", b"\0" * 1000)
        handle.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
        handle.writestr("pkg-1.0.dist-info/RECORD", "stale\n")
    prepare.slim(wheel, "pkg/examples/")
    with zipfile.ZipFile(wheel) as handle:
        assert sorted(handle.namelist()) == ["pkg-1.0.dist-info/METADATA", "pkg-1.0.dist-info/RECORD",
                                             "pkg/__init__.py"]
        record = {row[0]: row[1:] for row in csv.reader(handle.read("pkg-1.0.dist-info/RECORD").decode().splitlines())}
        for name in ("pkg/__init__.py", "pkg-1.0.dist-info/METADATA"):
            data = handle.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert record[name] == [f"sha256={digest}", str(len(data))]
        assert record["pkg-1.0.dist-info/RECORD"] == ["", ""]


def test_the_dag_part_checks_every_run_and_threat_of_the_table(tiny_params, tmp_path):
    """The DAG part's verdict on a table: accepted with one sane row per (run, threat), refused with a row
    missing or an AutoAttack accuracy above the clean one."""
    gpu_check = load("gpu_check")
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


def test_the_train_part_times_ours_against_the_port_at_cpu_scale():
    """The train part builds train_robust's own step and the port's loop (bench_train) and times both:
    each gives a positive rate and ours reports its host syncs."""
    gpu_check = load("gpu_check")
    port, ours = gpu_check.train_part(gpu_check.CPU, gpu_check.torch.device("cpu"))
    assert port["variant"] == "port (fp32)" and port["images_per_s"] > 0
    assert ours["images_per_s"] > 0 and ours["vs_port"] > 0 and "host_syncs_per_step" in ours


def test_a_part_whose_check_comes_out_false_keeps_its_rows_and_fails_the_run(tmp_path, monkeypatch):
    """The zoo part's clean accuracy off the published value (ok False) ran to the end: its rows stay in the
    report, its status is `failed` and the exit code is 1."""
    gpu_check = load("gpu_check")
    monkeypatch.setattr(gpu_check, "compile_part", lambda scale, device: [
        {"part": "compile", "variant": "probe", "images_per_s": 1.0, "peak_gib": None, "ok": False}])
    code = gpu_check.main(["--device", "cpu", "--parts", "compile", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")])
    assert code == 1
    entry = json.loads((tmp_path / "out" / "gpu_check-cpu.json").read_text())["parts"]["compile"]
    assert entry["status"] == "failed" and entry["error"] == "check failed: ok"
    assert entry["rows"][0]["variant"] == "probe"
    text = (tmp_path / "out" / "gpu_check-cpu.md").read_text()
    assert "| compile | probe |" in text and "- compile: failed (check failed: ok)" in text
