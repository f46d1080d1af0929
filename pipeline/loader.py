"""Mixed real + generated training batches, streamed from HDF5 image sets at constant memory.

Every batch holds `n_real` real images and `n_generated` generated ones (a fixed fraction, as in
Gowal et al. 2021). Which images go into batch `step` is a pure function of (seed, step): each pool
(real, generated) is an endless stream of pseudo-random permutations of its members, one permutation
per pass, and batch `step` takes stream positions [step * n, (step + 1) * n). So sample order never
depends on the number of DataLoader workers or on where a run was resumed, and the loader's position
is just the step number.

The permutation over all generated images (mixing across every shard) is a keyed Feistel network with
cycle walking, evaluated on demand: no index array the size of the pool is ever built, so memory does
not grow with the number of generated images (only the labels, 2 bytes per image, are held). Images
are read lazily by each DataLoader worker, which opens shard files itself (an LRU of handles), finds
where each chunk of rows lies once per file, and reads each shard's rows of a batch in sorted order
with os.pread (no HDF5 call, no cache growing per file).

Augmentation (pipeline/augment.py: random crop with 4 pixels of zero padding, horizontal flip) runs in
the workers on uint8 arrays, its randomness also drawn from (seed, step). Batches leave the workers as uint8 NCHW
tensors; the trainer converts them to float on the device.
"""

from __future__ import annotations

import os
import re
import signal
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import augment, seeding
from pipeline.labels import load_labels
from pipeline.shards import ShardError, count, expand

MAX_OPEN_FILES = 128   # file descriptors kept open per worker process
SHARD_NUMBER = re.compile(r"shard-(\d+)\.h5$")
_MASK64 = (1 << 64) - 1


# --- a permutation of [0, n) evaluated pointwise (constant memory) ---


def _round_function(right: np.ndarray, key: int, bits: int) -> np.ndarray:
    """A keyed mixing function (splitmix64 finaliser) on uint64 arrays, truncated to `bits` bits."""
    with np.errstate(over="ignore"):
        z = right + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z & np.uint64((1 << bits) - 1)


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """Image index at each position of a pseudo-random permutation of range(n) chosen by `key`.

    A balanced Feistel network on the smallest even-bit domain >= n is a bijection of that domain;
    cycle walking (re-applying it to values >= n) restricts it to a bijection of range(n).
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros(positions.shape, dtype=np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [seeding.derive("feistel", key, r) for r in range(rounds)]

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for k in keys:
            left, right = right, left ^ _round_function(right, k, half)
        return (left << np.uint64(half)) | right

    out = feistel(positions)
    outside = out >= n
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= n
    return out.astype(np.int64)


def stream_indices(start: int, count_: int, n: int, *seed_parts: object) -> np.ndarray:
    """Members at stream positions [start, start + count): pass p is permute(., n, seed(parts, p))."""
    positions = np.arange(start, start + count_, dtype=np.int64)
    out = np.empty(count_, dtype=np.int64)
    passes = positions // n
    for p in np.unique(passes):
        where = passes == p
        out[where] = permute(positions[where] % n, n, seeding.derive(*seed_parts, int(p)))
    return out


# --- pools of images on disk ---


@dataclass
class Pool:
    """Images spread over HDF5 files: member m is row `rows[m]` (or m itself) of the concatenation."""
    files: list[Path]
    offsets: np.ndarray            # int64, len(files) + 1: first concatenated row of each file
    labels: np.ndarray             # int16 label per member
    selection: np.ndarray | None   # int64 concatenated rows of the members, or None for all rows

    def __len__(self) -> int:
        return len(self.labels)

    def locate(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row in file) of each member."""
        rows = self.selection[members] if self.selection is not None else members
        file_index = np.searchsorted(self.offsets, rows, side="right") - 1
        return file_index, rows - self.offsets[file_index]


def _labels_of(shard: Path, sidecar: Path | None) -> np.ndarray:
    if sidecar is None:
        with h5py.File(shard, "r") as h5:
            return h5["labels"][()]
    return load_labels(shard, sidecar)["label"]  # checks the sidecar belongs to this shard, same length


def subsample(index: np.ndarray, amount: int, seed: int) -> np.ndarray:
    """The first `amount` rows of a fixed random order of a selection index (K x 2), sorted as the index is:
    the images a run of the data-amount sweep (variants.amounts) draws on. The order depends on `seed`
    alone, so smaller amounts are subsets of larger ones and every training seed sees the same images."""
    if amount > len(index):
        raise ValueError(f"variants.amounts: {amount} images asked for, but the selection holds {len(index)}")
    order = np.random.default_rng(seed).permutation(len(index))
    return index[np.sort(order[:amount])]


def pool(paths: list[Path], sidecars: list[Path] | None = None, selection: np.ndarray | None = None) -> Pool:
    """A pool over image sets; labels from the sets themselves or from pseudo-label sidecars.

    `selection` (pipeline.select output) is a K x 2 array of (shard number, row) pairs naming the
    members; shard number is the `{i}` of `shard-{i:05d}.h5`.
    """
    files = expand(paths)
    if not files:
        raise ShardError(f"no image sets found in {[str(p) for p in paths]}")
    side: list[Path | None] = [None] * len(files)
    if sidecars:
        side_files = expand(sidecars)
        if len(side_files) != len(files):
            raise ShardError(f"{len(side_files)} pseudo-label sidecars for {len(files)} shards")
        for shard, sidecar in zip(files, side_files):
            if shard.name != sidecar.name:
                raise ShardError(f"sidecar {sidecar} does not pair with shard {shard} (names differ)")
        side = list(side_files)
    counts = np.array([count(f) for f in files], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    labels = np.concatenate([_labels_of(f, s) for f, s in zip(files, side)]).astype(np.int64)
    rows = None
    if selection is not None:
        selection = np.asarray(selection, dtype=np.int64).reshape(-1, 2)
        numbers = {}
        for i, f in enumerate(files):
            m = SHARD_NUMBER.search(f.name)
            numbers[int(m.group(1)) if m else i] = i
        missing = set(np.unique(selection[:, 0]).tolist()) - set(numbers)
        if missing:
            raise ShardError(f"selection names shards {sorted(missing)[:5]} not among the {len(files)} given")
        file_index = np.array([numbers[s] for s in selection[:, 0]], dtype=np.int64)
        if (selection[:, 1] < 0).any() or (selection[:, 1] >= counts[file_index]).any():
            raise ShardError("selection holds rows outside their shard")
        rows = offsets[file_index] + selection[:, 1]
        labels = labels[rows]
    if (labels < 0).any():
        raise ShardError(f"{files[0].parent}: unlabelled images (label -1); pass the pseudo-label sidecars")
    return Pool(files, offsets, labels.astype(np.int16), rows)


# --- raw row reads from HDF5 files ---


class _Layout:
    """Where each image row of a file's `images` lies, for reads with os.pread and no HDF5 call per row.

    Our image sets are chunked along rows without compression (shards.write_imageset), so row r sits at
    chunk_offset[r // chunk_rows] + (r % chunk_rows) * row_bytes. HDF5's own random-row reads cost
    about 1 ms per batch selection element; pread is a few microseconds and allocates nothing that
    persists. Filtered (compressed) datasets fall back to h5py.
    """

    def __init__(self, path: Path, fd: int | None, offsets: np.ndarray, chunk_rows: int, row_shape: tuple,
                 filtered: bool) -> None:
        self.path, self.fd, self.offsets, self.chunk_rows = path, fd, offsets, chunk_rows
        self.row_shape, self.row_bytes = row_shape, int(np.prod(row_shape))
        self.filtered = filtered
        self.h5: h5py.File | None = None   # open only for filtered sets

    @classmethod
    def open(cls, path: Path) -> _Layout:
        h5 = h5py.File(path, "r", rdcc_nbytes=0)   # no chunk cache: reads are random
        ds = h5["images"]
        row_shape = tuple(ds.shape[1:])
        if ds.dtype != np.uint8:
            raise ShardError(f"{path}: images are {ds.dtype}, expected uint8")
        if ds.id.get_create_plist().get_nfilters():        # compressed: let HDF5 decode
            h5.close()
            return cls(path, None, np.zeros(0, np.int64), 0, row_shape, True)
        if ds.chunks is None:
            offsets, chunk_rows = np.array([ds.id.get_offset()], dtype=np.int64), max(1, ds.shape[0])
        else:
            chunk_rows = ds.chunks[0]
            offsets = np.empty(-(-ds.shape[0] // chunk_rows), dtype=np.int64)
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset
        h5.close()
        return cls(path, None, offsets, chunk_rows, row_shape, False)

    def read_rows(self, rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """out[at[i]] = image row rows[i]; rows sorted ascending for sequential access."""
        if self.filtered:
            if self.h5 is None:
                self.h5 = h5py.File(self.path, "r")
            unique_rows, inverse = np.unique(rows, return_inverse=True)
            out[at] = self.h5["images"][unique_rows][inverse]
            return
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        starts = self.offsets[rows // self.chunk_rows] + (rows % self.chunk_rows) * self.row_bytes
        flat = out.reshape(len(out), -1)
        for i, start in zip(at.tolist(), starts.tolist()):
            data = os.pread(self.fd, self.row_bytes, start)
            if len(data) != self.row_bytes:
                raise ShardError(f"{self.path}: short read at byte {start} (file truncated?)")
            flat[i] = np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        """Release the descriptor; the layout stays valid and reopens on the next read."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None


# --- the batch dataset ---


@dataclass(frozen=True)
class BatchSpec:
    batch_size: int        # global batch (all ranks)
    n_generated: int       # generated images per global batch
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def n_real(self) -> int:
        return self.batch_size - self.n_generated


def split_batch(batch_size: int, generated_fraction: float) -> tuple[int, int]:
    """(n_real, n_generated) per batch; the generated count is rounded to the nearest image."""
    n_gen = int(round(batch_size * generated_fraction))
    return batch_size - n_gen, n_gen


class MixedBatches(Dataset):
    """Map-style dataset whose item `step` is this rank's share of global batch `step`.

    Returns (images uint8 N x C x H x W, labels int64, generated bool). Use with batch_size=None.
    """

    def __init__(self, real: Pool, generated: Pool | None, spec: BatchSpec, augmentation: bool = True) -> None:
        if spec.n_generated and (generated is None or len(generated) == 0):
            raise ValueError("n_generated > 0 but no generated images")
        self.real, self.generated, self.spec, self.augmentation = real, generated, spec, augmentation
        self._layouts: dict[Path, _Layout] = {}
        self._open: OrderedDict[Path, _Layout] = OrderedDict()

    def __getstate__(self) -> dict:  # workers open their own files
        state = self.__dict__.copy()
        state["_layouts"], state["_open"] = {}, OrderedDict()
        return state

    def __len__(self) -> int:  # any step is valid; the sampler decides which are read
        return 1 << 62

    def _layout(self, path: Path) -> _Layout:
        """The file's layout (kept: ~1 KiB per 10k images); its descriptor is in a bounded LRU."""
        layout = self._layouts.get(path)
        if layout is None:
            layout = self._layouts[path] = _Layout.open(path)
        self._open[path] = layout
        self._open.move_to_end(path)
        while len(self._open) > MAX_OPEN_FILES:
            self._open.popitem(last=False)[1].close()
        return layout

    def read(self, source: Pool, members: np.ndarray) -> np.ndarray:
        """Images of `members`, reading each file's rows in sorted order (sequential within a file)."""
        file_index, rows = source.locate(members)
        out: np.ndarray | None = None
        for f in np.unique(file_index):
            where = np.flatnonzero(file_index == f)
            layout = self._layout(source.files[f])
            if out is None:
                out = np.empty((len(members), *layout.row_shape), dtype=np.uint8)
            order = where[np.argsort(rows[where], kind="stable")]
            layout.read_rows(rows[order], out, order)
        assert out is not None
        return out

    @property
    def real_rows(self) -> int:
        """This rank's real images per batch: the leading rows of every item (the generated ones follow)."""
        return len(np.array_split(np.arange(self.spec.n_real), self.spec.world_size)[self.spec.rank])

    def members(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's real members, generated members and their positions in global batch `step`."""
        spec = self.spec
        real = stream_indices(step * spec.n_real, spec.n_real, len(self.real), spec.seed, "real")
        gen = np.zeros(0, dtype=np.int64)
        if spec.n_generated:
            assert self.generated is not None  # __init__ refuses n_generated without generated images
            gen = stream_indices(step * spec.n_generated, spec.n_generated, len(self.generated),
                                 spec.seed, "generated")
        positions = np.arange(spec.batch_size)
        mine = np.concatenate([np.array_split(positions[:spec.n_real], spec.world_size)[spec.rank],
                               np.array_split(positions[spec.n_real:], spec.world_size)[spec.rank]])
        return (np.array_split(real, spec.world_size)[spec.rank],
                np.array_split(gen, spec.world_size)[spec.rank], mine)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real, gen, positions = self.members(step)
        parts = [self.read(self.real, real)]
        labels = [self.real.labels[real]]
        if len(gen):  # only when the spec asks for generated images, so the pool exists (__init__)
            assert self.generated is not None
            parts.append(self.read(self.generated, gen))
            labels.append(self.generated.labels[gen])
        images = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self.augmentation:
            # Drawn for the global batch, then sliced: augmentation does not depend on world size.
            params = augment.crop_flip_params(seeding.numpy_rng(self.spec.seed, "augment", step),
                                              self.spec.batch_size)
            images = augment.crop_flip(images, params[positions])
        generated = np.zeros(len(images), dtype=bool)
        generated[len(real):] = True
        return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                torch.from_numpy(np.concatenate(labels).astype(np.int64)),
                torch.from_numpy(generated))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # A scheduler's SIGTERM goes to the whole process group: workers ignore it so the trainer can finish
    # its step and checkpoint (they still exit when the trainer does).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset: Dataset, start_step: int, stop_step: int, num_workers: int,
           pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """Batches for steps [start_step, stop_step) in order; resuming is starting at another step."""
    kwargs: dict[str, Any] = {"prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init} if num_workers else {}
    return DataLoader(dataset, batch_size=None, sampler=range(start_step, stop_step),
                      num_workers=num_workers, pin_memory=pin_memory, **kwargs)
