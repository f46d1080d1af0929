"""HDF5 image sets: the one on-disk format for real and generated images alike.

A set is an HDF5 file with `images` (uint8, N x H x W x C) and `labels` (int64, N), plus attributes:
`sha256` (of the images and labels bytes, so corruption is detected), `n`, and free-form provenance
(generator, checkpoint hash, seed, index range, sampler, software version).

Writes are atomic: data go to a temporary file in the same directory, which is flushed, fsynced and
renamed, so a killed writer never leaves a finished-looking file under the final name, and two writers
racing for the same name each produce one complete file (the last rename wins, never an interleaving).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
# 64 images of 32x32x3 = 196 KiB per chunk: large enough for fast sequential writes and reads, small
# enough that a random read of one image touches little extra data (bench/bench_shards.py measures it).
CHUNK_ROWS = 64


_UMASK = os.umask(0)
os.umask(_UMASK)


class ShardError(RuntimeError):
    """An image set on disk is missing, truncated, corrupt or not what its manifest says."""


def content_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the raw bytes of images then labels (C order), the checksum stored in every set."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).data)
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return digest.hexdigest()


def arrays_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over named arrays in name order, the checksum stored in sidecar files."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).data)
    return digest.hexdigest()


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a whole file, for provenance of checkpoints and sets."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_imageset(
    path: Path, images: np.ndarray, labels: np.ndarray, attrs: dict[str, Any] | None = None
) -> str:
    """Write a complete image set atomically; return its content hash."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
    checksum = content_hash(images, labels)

    def fill(h5: h5py.File) -> None:
        rows = min(CHUNK_ROWS, len(images))   # an empty set (no unlabelled pool) is stored unchunked
        h5.create_dataset("images", data=images, chunks=(rows, *images.shape[1:]) if rows else None)
        h5.create_dataset("labels", data=labels)
        h5.attrs["n"] = len(images)

    _write_h5(Path(path), fill, checksum, attrs)
    return checksum


def write_arrays(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any] | None = None) -> str:
    """Write named arrays (e.g. pseudo-label sidecars) atomically with a checksum over all of them."""
    checksum = arrays_hash(arrays)

    def fill(h5: h5py.File) -> None:
        for name, array in arrays.items():
            h5.create_dataset(name, data=array)

    _write_h5(Path(path), fill, checksum, attrs)
    return checksum


def _write_h5(path: Path, fill, checksum: str, attrs: dict[str, Any] | None) -> None:
    """Atomically write an HDF5 file: `fill` adds the datasets, then checksum and provenance attrs.

    The file is built in memory and written with plain file I/O, so a full disk or a quota is one
    OSError naming the file, the previous file under `path` stays untouched and no temporary is left.
    (Letting HDF5 hit the full disk itself leaves its file handle half-closed, which crashes the
    interpreter at exit.)
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        fill(h5)
        h5.attrs["sha256"] = checksum
        h5.attrs["format_version"] = FORMAT_VERSION
        for key, value in (attrs or {}).items():
            h5.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
    except OSError as error:
        raise OSError(error.errno, f"{path}: could not write ({error.strerror or error}); "
                      "the previous file, if any, is untouched") from error


def _open(path: Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: missing")
    try:
        return h5py.File(path, "r")
    except OSError as error:  # truncated or not HDF5 at all
        raise ShardError(f"{path}: not a readable HDF5 image set (truncated or corrupt): {error}") from None


def read_attrs(path: Path) -> dict[str, Any]:
    """Provenance attributes of a set, without reading its data."""
    with _open(path) as h5:
        return {key: _decode(value) for key, value in h5.attrs.items()}


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_imageset(path: Path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a whole set (images, labels); with `verify`, check its checksum and name the file if bad."""
    path = Path(path)
    try:
        with _open(path) as h5:
            if "images" not in h5 or "labels" not in h5 or "sha256" not in h5.attrs:
                raise ShardError(f"{path}: not a complete image set (missing images, labels or sha256)")
            images = h5["images"][()]
            labels = h5["labels"][()]
            expected = _decode(h5.attrs["sha256"])
    except ShardError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise ShardError(f"{path}: corrupt data ({error})") from None
    if verify and content_hash(images, labels) != expected:
        raise ShardError(f"{path}: checksum mismatch (file corrupt or modified after writing)")
    return images, labels


def read_arrays(path: Path, verify: bool = True) -> dict[str, np.ndarray]:
    """Load every dataset of a sidecar file, verifying its checksum."""
    path = Path(path)
    try:
        with _open(path) as h5:
            arrays = {name: h5[name][()] for name in h5.keys()}
            expected = _decode(h5.attrs.get("sha256", ""))
    except ShardError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise ShardError(f"{path}: corrupt data ({error})") from None
    if verify:
        if arrays_hash(arrays) != expected:
            raise ShardError(f"{path}: checksum mismatch (file corrupt or modified after writing)")
    return arrays


def verify_imageset(path: Path) -> dict[str, Any]:
    """Raise ShardError naming `path` if the set is truncated or corrupt; return its attributes."""
    read_imageset(path, verify=True)
    return read_attrs(path)


def count(path: Path) -> int:
    """Number of images in a set, read from its header only."""
    with _open(path) as h5:
        return int(h5["images"].shape[0])


def set_sha256(paths: list[Path]) -> str:
    """Checksum of a generated set: sha256 of its shards' stored sha256 attributes, sorted, one a line.

    Reads only the HDF5 headers, so it is cheap at a million images; any change of a shard's content
    changes its attribute and so this value.
    """
    if not paths:
        raise ShardError("generated set has no shard-*.h5 files")
    sums = sorted(str(read_attrs(path)["sha256"]) for path in paths)
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()


def expand(paths: list[Path] | tuple[Path, ...]) -> list[Path]:
    """Shard files from a mix of files and directories (a directory means its shard-*.h5, sorted).

    Snakemake passes the shard files one by one, DVC passes the shard directory: both reach the same list.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted(path.glob("shard-*.h5")) if path.is_dir() else [path])
    return files
