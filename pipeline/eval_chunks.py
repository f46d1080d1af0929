"""The files of a chunked evaluation: which test images a chunk holds, reusing a finished chunk, and
checking chunk and sweep files before they are merged.

A chunk is `evaluate.chunk_size` consecutive test images, stored as `chunk-KKKKK.h5` (K its index,
from image K x chunk_size). Only the end of the test set cuts a chunk short, never `evaluate.n_eval`:
a chunk's results do not depend on how many chunks there are, so raising n_eval attacks only the new
chunks, and the merge keeps the first n_eval examples. Every file carries a fingerprint (JSON of
everything that decides its results); the merge recomputes it from params, the model and the test set,
and refuses a file made with anything else, naming the file and the fields that differ.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.shards import ShardError, atomic_path, read_arrays, read_attrs

log = logging.getLogger(__name__)
SWEEP_NAME = "sweep.h5"


class ChunkError(ValueError):
    """A chunk or sweep file the merge cannot use; the message names the file and what to rerun."""


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.h5"


def chunk_range(index: int, chunk_size: int, n_test: int) -> tuple[int, int]:
    """Test-image indices [start, stop) of chunk `index` (empty past the end of the test set)."""
    start = min(index * chunk_size, n_test)
    return start, min(start + chunk_size, n_test)


def reusable(path: Path, stamp: str) -> dict[str, np.ndarray] | None:
    """A finished chunk's arrays when `path` holds one with this fingerprint (resume); else None."""
    if not path.exists():
        return None
    try:
        if read_attrs(path).get("fingerprint") != stamp:
            log.warning("%s: made with other settings or model; attacking this chunk again", path)
            return None
        return read_arrays(path)
    except ShardError as error:
        log.warning("%s: unreadable (%s); attacking this chunk again", path, error)
        return None


def read_checked(path: Path, stamp: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and attributes of a file the merge needs, or ChunkError naming it: missing, corrupt
    (checksum) or made with other settings, model or test set than `stamp` says."""
    if not path.exists():
        raise ChunkError(f"{path}: missing ({what}); run the job that writes it first")
    try:
        attrs = read_attrs(path)
        arrays = read_arrays(path)
    except ShardError as error:
        raise ChunkError(f"{path}: corrupt ({what}): {error}; delete it and rerun its job") from None
    if attrs.get("fingerprint") != stamp:
        raise ChunkError(f"{path}: {what} was made with other inputs or settings "
                         f"({differences(str(attrs.get('fingerprint', '{}')), stamp)}); rerun its job")
    return arrays, attrs


def differences(found: str, expected: str) -> str:
    """`key found (expected value)` for each fingerprint field that differs."""
    try:
        have = json.loads(found)
    except json.JSONDecodeError:
        have = {}
    want = json.loads(expected)
    return ", ".join(f"{key} {str(have.get(key, 'absent'))[:16]} (expected {str(want[key])[:16]})"
                     for key in sorted(want) if have.get(key) != want[key]) or "no fingerprint"


def concatenate(parts: list[dict[str, np.ndarray]], n: int, where: Path) -> dict[str, np.ndarray]:
    """The chunks' per-example arrays end to end, cut to the first `n` examples; they must cover test
    images 0..n-1 in order (a chunk from another chunk size would not)."""
    merged = {key: np.concatenate([part[key] for part in parts])[:n] for key in parts[0]}
    if not np.array_equal(merged["index"], np.arange(n)):
        raise ChunkError(f"{where}: the chunks do not cover test images 0..{n - 1} in order")
    return merged


def copy_file(source: Path, target: Path) -> None:
    """Byte-for-byte copy, atomically (a chunk from the job's resume folder to its output)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(source.read_bytes())
