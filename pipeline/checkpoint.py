"""Resumable training state in a work directory (never a declared output, so reruns resume).

Checkpoints are step-numbered (`step-00001200.pt`), written atomically; `latest` loads the newest one
that reads back completely, so a file cut short by a kill is skipped rather than fatal. Older ones are
pruned, keeping `keep` of them.

Each checkpoint carries the `identity` of its run (config, seed, checksums of the inputs). A job rerun
because its params or inputs changed must not resume the old run (a finished checkpoint would be
returned as the new result); `latest(..., identity=)` moves such checkpoints aside into
`superseded-<hash>/` (kept, never deleted: going back to the old setting can reuse them by hand) and
starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.shards import atomic_path

log = logging.getLogger("pipeline.checkpoint")
PATTERN = re.compile(r"step-(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """The global RNGs a training loop may touch, so a resumed run draws the same numbers.

    On CUDA only the current device's generator: a process (one rank) draws on its own device, and a
    list of every visible GPU's state could not be restored with fewer GPUs visible (IndexError). The
    training stages draw their noise from explicit generators (pipeline/seeding.py) anyway.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`; the CUDA state goes to the current device (an older checkpoint's list of
    every GPU's state: its first entry, the one rank 0 drew from)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to `path` atomically, with bytes that depend only on `obj`.

    Saving through a file handle, not the temporary path: torch.save records a path's (random) name in
    the archive, which would make identical models hash differently between runs.
    """
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def save(workdir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as step-{step}.pt atomically and prune older checkpoints."""
    workdir = Path(workdir)
    path = workdir / f"step-{step:08d}.pt"
    save_atomic(state, path)
    for old in sorted(_checkpoints(workdir))[:-keep]:
        old[1].unlink(missing_ok=True)
    return path


def _checkpoints(workdir: Path) -> list[tuple[int, Path]]:
    if not Path(workdir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(workdir).iterdir() if (m := PATTERN.search(p.name))]
    return sorted(found)


def fingerprint(identity: Any) -> str:
    """sha256 of an identity (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def latest(workdir: Path, map_location: str | torch.device = "cpu", identity: dict[str, Any] | None = None,
           move_aside: bool = True) -> dict[str, Any] | None:
    """The newest readable checkpoint's state, or None when there is none.

    With `identity`, checkpoints of another run identity are not resumed: they are moved to
    superseded-<hash>/ (by the caller with `move_aside`, e.g. rank 0 only) and None is returned.
    """
    workdir = Path(workdir)
    for _, path in reversed(_checkpoints(workdir)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:  # cut short by a kill or a full disk: fall back to the previous one
            log.warning("%s: unreadable checkpoint skipped (%s)", path, error)
            continue
        if identity is not None and state.get("identity") != identity:
            aside = workdir / f"superseded-{fingerprint(state.get('identity'))[:12]}"
            if move_aside:
                aside.mkdir(exist_ok=True)
                for _, old in _checkpoints(workdir):
                    old.rename(aside / old.name)
            log.warning("%s: checkpoints of another setting (config, seed or inputs differ) moved to %s; "
                        "starting afresh", workdir, aside)
            return None
        log.info("resuming from %s", path)
        return state
    return None
