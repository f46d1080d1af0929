"""Run a stage module as `python -m` would, and freeze the process the moment it gives its first file
matching PATTERN in DIRECTORY its final name.

    python tests/faults/stop_at.py DIRECTORY PATTERN -m pipeline.<stage> [stage arguments...]

Stages write every checkpoint, shard, sidecar and chunk to a temporary name and `os.replace` it onto
the final one (pipeline.shards.atomic_path). This wrapper lets that rename happen, then stops the
process with SIGSTOP, so the fault harness (tests/faults/harness.py) can deliver its signal at exactly
that point of progress however fast the machine is: a stopped process cannot run on and finish first.
A SIGKILL ends it where it stands; a SIGTERM is handled once the harness sends SIGCONT. Only the first
matching file stops the process.
"""

from __future__ import annotations

import fnmatch
import os
import runpy
import signal
import sys


def main() -> None:
    directory, pattern, flag, module, *arguments = sys.argv[1:]
    if flag != "-m":
        raise SystemExit(f"usage: {sys.argv[0]} DIRECTORY PATTERN -m MODULE [ARGS...]")
    directory = os.path.realpath(directory)
    real_replace = os.replace
    stopped = False

    def replace(src, dst, *args, **kwargs):
        nonlocal stopped
        real_replace(src, dst, *args, **kwargs)
        target = os.fsdecode(dst)
        if (not stopped and fnmatch.fnmatch(os.path.basename(target), pattern)
                and os.path.realpath(os.path.dirname(os.path.abspath(target))) == directory):
            stopped = True
            os.kill(os.getpid(), signal.SIGSTOP)

    os.replace = replace
    sys.argv = [module, *arguments]
    sys.path[0] = os.getcwd()   # what `python -m` puts first, instead of this file's folder
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
