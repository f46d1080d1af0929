"""Kill a stage CLI mid-way, rerun the same command, and compare with an uninterrupted run.

`interrupt` starts a command, waits until `ready(workdir)` says it has made progress worth losing (a
checkpoint written, a temporary file present), then sends the signal. Rerunning the same command is
all a user (or Snakemake's retry, or SLURM's requeue) does.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipeline import params as params_mod
from tests.conftest import DEMO_ARCHIVE, REPO, tiny_overrides

BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PATH"] = f"{BIN}{os.pathsep}{environment.get('PATH', '')}"
    environment["OMP_NUM_THREADS"] = "1"  # bit-identical CPU results need the same thread count
    return environment


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def interrupt(args: list[str], ready: Callable[[], bool], sig: signal.Signals,
              timeout: float = 300.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `args`, send `sig` once `ready()` is true; return the finished process (it must not succeed
    silently: if it completed before the signal, the test is skipped as inconclusive)."""
    process = subprocess.Popen(args, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            out, err = process.communicate()
            if process.returncode == 0:
                pytest.skip("the stage finished before it could be interrupted (inconclusive)")
            pytest.fail(f"stage failed before the fault was injected:\n{err[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("stage made no progress before the timeout")
        time.sleep(0.05)
    signalled_at = time.time()
    process.send_signal(sig)
    out, err = process.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(args, process.returncode, out, err)
    result.signalled_at = signalled_at  # wall time the signal was sent, to date files written after it
    return result


def files_matching(directory: Path, pattern: str) -> Callable[[], bool]:
    return lambda: Path(directory).is_dir() and any(Path(directory).glob(pattern))


def tiny_config() -> dict:
    """tests/conftest.py's tiny params (a function-scoped fixture there), for module-scoped fixtures."""
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg = params_mod.deep_merge(default, tiny_overrides())
    cfg["data"]["archive"] = str(DEMO_ARCHIVE)
    return params_mod.validate(copy.deepcopy(cfg))
