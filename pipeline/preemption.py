"""SIGTERM handling shared by every stage with checkpoints (teacher, DDPM training, robust training).

SLURM (and Kubernetes, and `timeout`) send SIGTERM some seconds before SIGKILL when a job reaches its
time limit or is preempted. The training loops watch `SigtermFlag.received` after every step, write a
checkpoint of exactly where they are and leave with `Preempted` (exit status 143, 128 + SIGTERM, what
a scheduler expects from a preempted job). Rerunning the same command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGTERM_EXIT = 143   # 128 + SIGTERM


class Preempted(SystemExit):
    """SIGTERM arrived; a checkpoint was written."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (stopped before the bad step reached a checkpoint)."""


class SigtermFlag:
    """Remembers a SIGTERM so the loop can checkpoint after the current step, then exit.

    Installs its handler only in the main thread (signal handlers cannot be set elsewhere, e.g. when a
    test calls the loop from a worker thread) and restores the previous handler on exit.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
