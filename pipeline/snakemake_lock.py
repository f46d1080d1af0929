"""Recover from the lock a Snakemake controller leaves when it dies hard (SIGKILL, the OOM killer, a
dropped login session), so that "start the same command again" works.

Snakemake locks its working directory while it runs: `.snakemake/locks/*.lock` list the files it may
read and write, with no owner (snakemake/persistence/file.py `_write_locks`), and it deletes them when
it ends. Killed hard it cannot, and every later start stops with LockException until someone runs
`snakemake --unlock`. So each controller started through our Snakefile leaves an owner record, and
the next start decides (`guard`, called at the top of the Snakefile, in the controller only: jobs
re-run the Snakefile with Snakemake's subprocess or remote mode and never take the lock):

- no lock files: nothing to do;
- every recorded controller ran on this machine since its last boot and is gone (no process with its
  pid and start time): the lock is stale and is removed, as `snakemake --unlock` does, with a warning;
- a recorded controller is alive here (e.g. a second terminal): the lock is kept and Snakemake refuses
  as it always does;
- a controller recorded on another host (a cluster's other login node) or no record at all: this
  machine cannot tell whether it still runs; the lock is kept, with one line saying what to run.

Records live in `.snakemake/robustgen-controllers/<host>-<pid>.json` (host, boot id, pid, the process
start time from /proc/<pid>/stat); a controller removes its own at exit, and records of controllers
found gone are removed too.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCKS = Path(".snakemake") / "locks"
RECORDS = Path(".snakemake") / "robustgen-controllers"


@dataclass(frozen=True)
class Owner:
    """A controller process: where it ran and how to recognise it (a pid alone can be reused)."""
    host: str
    boot: str | None         # /proc/sys/kernel/random/boot_id: a reboot ends every process
    pid: int
    start: int | None        # start time in clock ticks since boot (/proc/<pid>/stat field 22)
    argv: list[str]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None without /proc or without the process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])   # fields after "(comm)": state is field 3, start 22


def this_process() -> Owner:
    return Owner(socket.gethostname(), _boot_id(), os.getpid(), start_ticks(os.getpid()), list(sys.argv))


def alive(owner: Owner) -> bool | None:
    """Whether the recorded controller still runs; None when this machine cannot tell (another host)."""
    if owner.host != socket.gethostname():
        return None
    if owner.boot is not None and owner.boot != _boot_id():
        return False
    if owner.start is not None:
        return start_ticks(owner.pid) == owner.start
    try:  # no /proc (macOS): the pid alone, which errs on the side of "alive"
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def records(root: Path) -> dict[Path, Owner]:
    found = {}
    for path in sorted((root / RECORDS).glob("*.json")):
        try:
            found[path] = Owner(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):   # cut short or foreign: not a controller we can check
            continue
    return found


def describe(owner: Owner) -> str:
    return f"pid {owner.pid} on {owner.host} ({' '.join(owner.argv)})"


def recover(root: Path, unlocking: bool = False) -> str | None:
    """Remove a stale lock in `root` (see the module docstring); returns the line to show, if any.
    `unlocking` (a `snakemake --unlock` run): records of controllers that cannot be checked are dropped
    too, since the user has just declared the lock dead."""
    owners = records(root)
    state = {path: alive(owner) for path, owner in owners.items()}
    for path, running in state.items():
        if running is False or (running is None and unlocking):
            path.unlink(missing_ok=True)
    if not any((root / LOCKS).glob("*.lock")):
        return None
    live = [owners[p] for p, running in state.items() if running]
    unknown = [owners[p] for p, running in state.items() if running is None]
    if live:
        return None   # Snakemake refuses with its own LockException: another instance really runs here
    if unknown and not unlocking:
        return (f"robustgen: {root} is locked by a Snakemake controller this machine cannot check: "
                f"{describe(unknown[0])}. If it still runs, wait for it or stop it there; if it is gone, run "
                f"`snakemake --unlock` (with the same profile and targets), then the same command again.")
    if not owners and not unlocking:
        return (f"robustgen: {root} is locked by a Snakemake run that left no owner record. If no snakemake "
                f"runs in this directory, run `snakemake --unlock`, then the same command again.")
    shutil.rmtree(root / LOCKS, ignore_errors=True)
    gone = ", ".join(describe(owners[p]) for p in state) or "none recorded"
    return f"robustgen: removed the stale lock of a Snakemake controller that is no longer running ({gone})"


def register(root: Path) -> Path:
    """Record this process as a controller of `root` until it exits."""
    me = this_process()
    path = root / RECORDS / f"{me.host}-{me.pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(me)))
    os.replace(tmp, path)
    atexit.register(path.unlink, missing_ok=True)
    return path


def guard(workflow: Any, root: Path | None = None) -> None:
    """The Snakefile's call: in the controller, recover a stale lock and record this controller; in a
    job (Snakemake's subprocess or remote mode) nothing."""
    if workflow.remote_exec or workflow.subprocess_exec:
        return
    root = Path.cwd() if root is None else root
    message = recover(root, unlocking="--unlock" in sys.argv[1:])
    if message:
        print(message, file=sys.stderr, flush=True)
    register(root)
