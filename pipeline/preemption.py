"""SIGTERM handling shared by every stage with checkpoints (teacher, DDPM training, robust training).

SLURM (and Kubernetes, and `timeout`) send SIGTERM some seconds before SIGKILL when a job reaches its
time limit or is preempted. The training loops watch `SigtermFlag.received` after every step, write a
checkpoint of exactly where they are and leave with `Preempted` (exit status 143, 128 + SIGTERM, what
a scheduler expects from a preempted job). Rerunning the same command resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline.preemption")

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


def checkpoint_after_step(received: bool, done: int, total: int, every: int, save: Callable[[int], None],
                          workdir: Path, bar: Any = None) -> None:
    """The checkpoint rule of every step loop (DDPM, CVAE, teacher, robust training), called after each
    step with `done` steps finished: save every `every` steps, at the last step, and when SIGTERM was
    `received`; after a SIGTERM save before the last step, close the progress bar and leave with
    Preempted. A SIGTERM during the last step lets the run finish: its final checkpoint is written and
    the outputs take seconds.

    `received` is usually `SigtermFlag.received`; a data-parallel loop passes the flag agreed by all
    ranks, so that every rank saves (save() may hold a collective) and leaves at the same step.
    """
    if done % every == 0 or done == total or received:
        save(done)
    if received and done < total:
        if bar is not None:
            bar.close()
        log.warning("SIGTERM: checkpoint at step %d in %s; rerun the same command to resume", done, workdir)
        raise Preempted(SIGTERM_EXIT)
