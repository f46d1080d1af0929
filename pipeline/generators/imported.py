"""Imported generated sets (.npz / .npy, as released with the paper and later work), streamed into shards.

Accepted sources (uint8 `image` N x 32 x 32 x 3, integer `label` N in 0..9):
- `foo.npz` with members `image` and `label` (np.savez or np.savez_compressed);
- `foo.npy` holding the images, with the labels in `foo_label.npy` beside it (`image.npy` pairs with
  `label.npy`, i.e. an unzipped .npz).
"train" validates the file and writes a small manifest (paths, sha256, n, format) as model.pt.
Reading never loads a whole array: .npy files and uncompressed .npz members are memory-mapped per
read and unmapped afterwards (np.load(mmap_mode='r') cannot map an .npz member, so the member's data
offset is found from its zip local header); compressed members are decompressed as a stream, only up
to the rows asked for. Peak memory is set by the rows read at once, not by N.
"""

from __future__ import annotations

import logging
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from pipeline.checkpoint import save_atomic
from pipeline.generators.base import SampleSettings
from pipeline.params import key
from pipeline.shards import file_sha256

log = logging.getLogger("pipeline.generators.imported")
NAME = "import"
IMAGE_SHAPE = (32, 32, 3)
CHUNK_ROWS = 8192  # rows per read while validating (25 MB of images)


class SourceError(ValueError):
    """The source file is missing or not in the accepted format; the message names the file."""


@dataclass(frozen=True)
class Config:
    """params.yaml `train_generator.import:`."""
    path: str = key(".npz/.npy with uint8 image and int label")


def _read_header(handle: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        return np.lib.format.read_array_header_2_0(handle)
    except ValueError as error:
        raise SourceError(f"{where}: not a .npy array ({error})") from None


class ArrayReader:
    """Row ranges of one .npy array, a standalone file or an .npz member, without loading it whole."""

    def __init__(self, path: Path, member: str | None = None) -> None:
        self.path, self.member = Path(path), member
        self.where = f"{path}[{member}]" if member else str(path)
        self.compressed = False
        self._stream: IO[bytes] | None = None
        self._stream_row = 0
        if member is None:
            with open(self.path, "rb") as handle:
                self.shape, fortran, self.dtype = _read_header(handle, self.where)
                self.offset = handle.tell()
        else:
            with zipfile.ZipFile(self.path) as archive:
                info = archive.getinfo(member)
                if info.flag_bits & 0x1:
                    raise SourceError(f"{self.where}: encrypted zip members are not supported")
                self.compressed = info.compress_type != zipfile.ZIP_STORED
                with archive.open(info) as stream:
                    self.shape, fortran, self.dtype = _read_header(stream, self.where)
                    header_len = stream.tell() if not self.compressed else None
            if not self.compressed:
                with open(self.path, "rb") as raw:  # local header: 30 bytes + name + extra, then data
                    raw.seek(info.header_offset)
                    fixed = raw.read(30)
                    if fixed[:4] != b"PK\x03\x04":
                        raise SourceError(f"{self.where}: bad zip local header")
                    name_len, extra_len = struct.unpack("<HH", fixed[26:30])
                    self.offset = info.header_offset + 30 + name_len + extra_len + header_len
        if fortran:
            raise SourceError(f"{self.where}: Fortran-ordered arrays are not supported; save C order")
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of rows [start, stop)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"{self.where}: rows [{start}, {stop}) outside 0..{len(self)}")
        if not self.compressed:
            if start == stop:
                return np.zeros((0, *self.row_shape), self.dtype)
            # map just these rows and drop the map at once: mapped pages count in RSS while mapped,
            # so one long-lived map of the whole file would grow to N rows over a run
            mapped = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * self.row_bytes,
                               shape=(stop - start, *self.row_shape))
            rows = np.array(mapped)
            del mapped  # unmapped here (no other reference)
            return rows
        return self._read_stream(start, stop)

    def _read_stream(self, start: int, stop: int) -> np.ndarray:
        if self._stream is None or start < self._stream_row:  # reopen: a zip stream only goes forward
            self.close()
            assert self.member is not None  # only zip members are compressed, so only they are streamed
            self._archive = zipfile.ZipFile(self.path)
            self._stream = self._archive.open(self.member)
            _read_header(self._stream, self.where)
            self._stream_row = 0
        while self._stream_row < start:  # skip forward in bounded chunks
            rows = min(start - self._stream_row, CHUNK_ROWS)
            self._read_exact(rows * self.row_bytes)
            self._stream_row += rows
        data = self._read_exact((stop - start) * self.row_bytes)
        self._stream_row = stop
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.row_shape).copy()

    def _read_exact(self, n: int) -> bytearray:
        assert self._stream is not None
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            chunk = self._stream.readinto(view[got:])  # type: ignore[attr-defined]  # a ZipExtFile; typed IO[bytes]
            if not chunk:
                raise SourceError(f"{self.where}: truncated (ended {n - got} bytes early)")
            got += chunk
        return buffer

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._archive.close()
            self._stream = None


def open_source(path: Path) -> tuple[ArrayReader, ArrayReader, str]:
    """(images, labels, format) readers for an accepted source; raise SourceError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: import source not found")
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
            missing = {"image.npy", "label.npy"} - names
            if missing:
                raise SourceError(f"{path}: missing member(s) {sorted(m[:-4] for m in missing)}; "
                                   f"has {sorted(n[:-4] for n in names)} (need `image` and `label`)")
            return ArrayReader(path, "image.npy"), ArrayReader(path, "label.npy"), "npz"
        if path.suffix == ".npy":
            label_path = labels_beside(path)
            if not label_path.exists():
                raise SourceError(f"{path}: labels file {label_path} not found beside the images")
            return ArrayReader(path), ArrayReader(label_path), "npy"
    except (zipfile.BadZipFile, OSError) as error:
        raise SourceError(f"{path}: unreadable ({error})") from None
    raise SourceError(f"{path}: unsupported format (need .npz or .npy)")


def labels_beside(path: Path) -> Path:
    return path.with_name("label.npy" if path.stem == "image" else f"{path.stem}_label.npy")


def validate(path: Path) -> dict[str, Any]:
    """Check shapes, dtypes and label range in bounded chunks; return the manifest fields."""
    images, labels, fmt = open_source(path)
    if images.dtype != np.uint8 or len(images.shape) != 4 or images.row_shape != IMAGE_SHAPE:
        raise SourceError(f"{images.where}: need uint8 N x 32 x 32 x 3 images, got "
                           f"{images.dtype} {images.shape}")
    if labels.dtype.kind not in "iu" or len(labels.shape) != 1:
        raise SourceError(f"{labels.where}: need integer labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise SourceError(f"{path}: {len(images)} images but {len(labels)} labels")
    for lo in range(0, len(labels), CHUNK_ROWS * 16):
        chunk = labels.read(lo, min(lo + CHUNK_ROWS * 16, len(labels)))
        if chunk.min() < 0 or chunk.max() > 9:
            raise SourceError(f"{labels.where}: labels must lie in 0..9, found {chunk.min()}..{chunk.max()}")
    labels.close()
    images.close()
    files = [path] if fmt == "npz" else [path, labels_beside(path)]
    return {"kind": NAME, "format": fmt, "n": len(images), "source": str(path),
            "files": {str(f): {"sha256": file_sha256(f), "size": f.stat().st_size} for f in files}}


def train(cfg: Config, train_h5: Path, workdir: Path, out: Path, seed: int, device: torch.device) -> None:
    """Validate the source and write the manifest (the 'model' of an imported set)."""
    if not cfg.path:
        raise SourceError("train_generator.import.path: empty; name the .npz/.npy to import")
    manifest = validate(Path(cfg.path))
    log.info("%s: %d images (%s)", cfg.path, manifest["n"], manifest["format"])
    save_atomic(manifest, out)


class ImportSampler:
    """'Samples' index i as row i of the source; sizes are re-checked so a swapped file is caught."""

    name = NAME

    def __init__(self, manifest: dict[str, Any]) -> None:
        for file, facts in manifest["files"].items():
            if not Path(file).exists() or Path(file).stat().st_size != facts["size"]:
                raise SourceError(f"{file}: missing or changed since train_generator validated it "
                                   "(size differs); rerun train_generator")
        self.images, self.labels, _ = open_source(Path(manifest["source"]))
        self.n = manifest["n"]

    def sample(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if stop > self.n:
            raise SourceError(f"{self.images.where}: has {self.n} images, asked for index {stop - 1} "
                               "(generate.n_images too large for this import)")
        return self.images.read(start, stop), self.labels.read(start, stop).astype(np.int64)

    def provenance(self) -> dict[str, Any]:
        return {"sampler": "import", "steps": 0}


def load(model: Path, settings: SampleSettings, device: torch.device) -> ImportSampler:
    manifest = torch.load(model, map_location="cpu", weights_only=False)
    if manifest.get("kind") != NAME:
        raise ValueError(f"{model}: not an import manifest (kind {manifest.get('kind')!r})")
    return ImportSampler(manifest)
