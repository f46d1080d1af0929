"""Kill a stage CLI mid-way, rerun the same command, and compare with an uninterrupted run.

`interrupt` starts a stage command under tests/faults/stop_at.py, which freezes the process (SIGSTOP)
right after it gives its first file matching a marker (a checkpoint, a shard, a sidecar, a chunk) its
final name: progress worth losing. The signal goes in then, followed by SIGCONT, so where the signal
lands does not depend on the machine's speed. A stage that finishes without writing the marker fails
the test (it would prove nothing). Rerunning the same command is all a user (or Snakemake's retry, or
SLURM's requeue) does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import helpers

STOP_AT = Path(__file__).resolve().parent / "stop_at.py"


def env() -> dict[str, str]:
    """helpers.env() with one OpenMP thread whatever the caller's environment: the reference, the
    interrupted and the resumed runs must use the same thread count to agree bit for bit."""
    environment = helpers.env()
    environment["OMP_NUM_THREADS"] = "1"
    return environment


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return helpers.run(args, cwd, environment=env())


@dataclass(frozen=True)
class Marker:
    """The first file named `pattern` (a glob) that a stage gives its final name in `directory`."""

    directory: Path
    pattern: str


def files_matching(directory: Path, pattern: str) -> Marker:
    return Marker(Path(directory), pattern)


def _state(pid: int) -> str:
    """'stopped', 'exited' or 'running', without reaping the process (Popen still collects it)."""
    found = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if found is None or found.si_pid == 0:
        return "running"
    return "stopped" if found.si_code == os.CLD_STOPPED else "exited"


def interrupt(args: list[str], at: Marker, sig: signal.Signals, timeout: float = 300.0,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `args` (`python -m pipeline.<stage> ...`), send `sig` once the stage has written `at`; return
    the finished process. `signalled_at` on the result is the wall time the signal was sent."""
    if args[1:2] != ["-m"]:
        raise ValueError(f"interrupt runs `python -m <module> ...` commands, got {args[:3]}")
    wrapped = [args[0], str(STOP_AT), str(at.directory), at.pattern, *args[1:]]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: nobody reads while the stage runs, and a full pipe would block it.
        process = subprocess.Popen(wrapped, cwd=cwd, env=env(), stdout=out, stderr=err, text=True)

        def output() -> tuple[str, str]:
            out.seek(0)
            err.seek(0)
            return out.read(), err.read()

        deadline = time.monotonic() + timeout
        while (state := _state(process.pid)) == "running":
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"no {at.pattern} in {at.directory} within {timeout:.0f} s:\n{output()[1][-4000:]}")
            time.sleep(0.02)
        if state == "exited":
            process.wait()
            stderr = output()[1][-4000:]
            if process.returncode == 0:
                pytest.fail(f"the stage finished without writing {at.pattern} in {at.directory}, so it was "
                            f"never interrupted: give it more steps, shards or chunks, or fix the marker:\n{stderr}")
            pytest.fail(f"the stage failed before the fault was injected ({process.returncode}):\n{stderr}")
        signalled_at = time.time()
        process.send_signal(sig)
        if sig != signal.SIGKILL:
            os.kill(process.pid, signal.SIGCONT)   # a stopped process handles the signal once continued
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the stage did not end within {timeout:.0f} s of {sig.name}:\n{output()[1][-4000:]}")
        stdout, stderr = output()
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    result.signalled_at = signalled_at  # type: ignore[attr-defined]  # to date files written after it
    return result
