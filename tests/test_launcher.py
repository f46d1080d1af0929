"""rules/common.smk's `launcher`: a job with several GPUs runs under torchrun with a shutdown timeout long
enough for the SIGTERM checkpoint (torchrun's default 30 s SIGKILLs a WRN-70-16 rank while it saves)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from pipeline import params as P
from tests.helpers import BIN, REPO, env, make_workdir


def declared_timeout() -> int:
    match = re.search(r"^TORCHRUN_SHUTDOWN_TIMEOUT_S = (\d+)", (REPO / "rules" / "common.smk").read_text(), re.M)
    assert match, "rules/common.smk: TORCHRUN_SHUTDOWN_TIMEOUT_S not found"
    return int(match.group(1))


@pytest.mark.slow
def test_a_two_gpu_training_job_gives_torchrun_time_to_checkpoint(tmp_path):
    workdir = make_workdir(tmp_path / "workflow")
    run = P.runs(P.validate(yaml.safe_load((workdir / "params.yaml").read_text())))[0]
    done = subprocess.run([str(BIN / "snakemake"), f"models/robust/{run}/last.pt", "-n", "-p", "--forceall",
                           "--cores", "4", "--resources", "gpu=2", "--set-resources", "train_robust:gpu=2"],
                          cwd=workdir, env=env(), capture_output=True, text=True, check=True)
    commands = [line for line in done.stdout.splitlines() if "pipeline.train_robust" in line]
    assert commands and all("torchrun" in line for line in commands), done.stdout[-2000:]
    timeout = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=(\d+) torchrun", commands[0])
    assert timeout, commands[0]
    assert int(timeout.group(1)) == declared_timeout() >= 120   # a step, a validation pass and a 3 GB save
