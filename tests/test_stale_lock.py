"""A Snakemake controller killed hard leaves its lock: the same command started again removes it when
its owner is gone, keeps it while the owner lives, and says what to run when it cannot tell."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import snakemake_lock as lock
from tests.helpers import BIN, env, make_workdir


def locked(root: Path) -> Path:
    (root / lock.LOCKS).mkdir(parents=True)
    (root / lock.LOCKS / "0.output.lock").write_text("results/cifar10_table.csv\n")
    return root / lock.LOCKS


def record(root: Path, owner: lock.Owner) -> Path:
    path = root / lock.RECORDS / f"{owner.host}-{owner.pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(owner)))
    return path


@pytest.fixture()
def sleeper():
    """A live process other than this one, as a stand-in controller."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def owner_of(process: subprocess.Popen, **changes) -> lock.Owner:
    fields = {"pid": process.pid, "start": lock.start_ticks(process.pid), "argv": ["snakemake"], **changes}
    return dataclasses.replace(lock.this_process(), **fields)


def test_a_dead_controllers_lock_is_removed(tmp_path, sleeper):
    locks = locked(tmp_path)
    stale = record(tmp_path, owner_of(sleeper))
    sleeper.kill()
    sleeper.wait()
    message = lock.recover(tmp_path)
    assert "removed the stale lock" in message and f"pid {sleeper.pid}" in message
    assert not locks.exists() and not stale.exists()


def test_a_reused_pid_is_not_the_controller(tmp_path, sleeper):
    """Same pid, other start time: the controller is gone and a new process took its number."""
    locks = locked(tmp_path)
    record(tmp_path, owner_of(sleeper, start=lock.start_ticks(sleeper.pid) - 1))
    assert "removed the stale lock" in lock.recover(tmp_path)
    assert not locks.exists()


def test_a_live_controllers_lock_is_kept(tmp_path, sleeper):
    locks = locked(tmp_path)
    kept = record(tmp_path, owner_of(sleeper))
    assert lock.recover(tmp_path) is None          # Snakemake then refuses with its own LockException
    assert locks.exists() and kept.exists()


def test_a_controller_on_another_host_cannot_be_checked(tmp_path, sleeper):
    locks = locked(tmp_path)
    record(tmp_path, owner_of(sleeper, host="login2.cluster.example"))
    message = lock.recover(tmp_path)
    assert "login2.cluster.example" in message and "`snakemake --unlock`" in message
    assert locks.exists()
    # `snakemake --unlock` drops the unverifiable record with the lock (Snakemake removes the lock itself)
    assert lock.recover(tmp_path, unlocking=True) is not None
    assert not list((tmp_path / lock.RECORDS).glob("*.json"))


def test_a_lock_without_records_is_explained_and_kept(tmp_path):
    locks = locked(tmp_path)
    assert "`snakemake --unlock`" in lock.recover(tmp_path)
    assert locks.exists()


def test_no_lock_no_message_and_dead_records_are_cleaned(tmp_path, sleeper):
    old = record(tmp_path, owner_of(sleeper, boot="an-earlier-boot"))
    assert lock.recover(tmp_path) is None and not old.exists()


def test_jobs_never_touch_the_lock(tmp_path):
    """A job re-running the Snakefile (subprocess or remote mode) neither recovers nor records."""
    class Job:
        remote_exec, subprocess_exec = True, False

    locks = locked(tmp_path)
    lock.guard(Job(), tmp_path)
    assert locks.exists() and not (tmp_path / lock.RECORDS).exists()


# --- a real controller, SIGSTOPped then SIGKILLed ---


TARGET = "models/teacher/model.pt"   # data, then teacher: the kill lands while the teacher job runs


def start_controller(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", TARGET], cwd=workdir, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_progress(workdir: Path, controller: subprocess.Popen, timeout: float = 240) -> None:
    """Until the controller holds its lock and the teacher job has written its first checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (list((workdir / lock.LOCKS).glob("*.lock")) and list((workdir / lock.RECORDS).glob("*.json"))
                and list((workdir / "work" / "teacher").glob("*.pt"))):
            return
        if controller.poll() is not None:
            pytest.fail(f"snakemake ended ({controller.returncode}) before the marker:\n{controller.stdout.read()}")
        time.sleep(0.2)
    pytest.fail("no teacher checkpoint within the timeout")


def same_command(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "snakemake"), "--cores", "1", TARGET], cwd=workdir, env=env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkilled_controller_then_the_same_command_completes(tmp_path):
    workdir = make_workdir(tmp_path / "demo")
    controller = start_controller(workdir)
    try:
        wait_for_progress(workdir, controller)
        os.killpg(controller.pid, signal.SIGSTOP)             # alive, holding the lock
        refused = same_command(workdir)
        assert refused.returncode != 0 and "LockException" in refused.stdout + refused.stderr
        assert "removed the stale lock" not in refused.stderr and list((workdir / lock.LOCKS).glob("*.lock"))
        os.killpg(controller.pid, signal.SIGKILL)             # as the OOM killer or a dropped login would
        controller.wait(timeout=60)
    finally:
        if controller.poll() is None:
            os.killpg(controller.pid, signal.SIGKILL)
            controller.wait()
    assert list((workdir / lock.LOCKS).glob("*.lock")), "the killed controller left no lock to recover from"
    again = same_command(workdir)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert "removed the stale lock" in output and "LockException" not in output
    assert (workdir / TARGET).exists() and not (workdir / lock.LOCKS).exists()
    assert not list((workdir / lock.RECORDS).glob("*.json"))      # each controller removed its record
