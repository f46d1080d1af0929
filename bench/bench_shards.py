"""Shard I/O: write throughput of pipeline.shards vs numpy .npy, and random-read speed vs chunk size.

    python bench/bench_shards.py [--images 10000] [--reads 2000] [--repeats 3]

Write: the same uint8 images + int64 labels through `shards.write_imageset` (HDF5, sha256, fsync,
rename) and through `np.save` to .npy (with and without fsync, so the durable cases compare fairly).
Read: the training loader draws random images, so for HDF5 chunks of 1, 16, 64 (ours), 256 rows and
contiguous storage we time single random rows and random sorted batches of 128, against a memory-mapped
.npy in the same run. Files are in the page cache (a warm node), which isolates the format's overhead.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline import shards


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    megabytes = (images.nbytes + labels.nbytes) / 1e6
    print(f"# {platform.machine()}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), "
          f"numpy {np.__version__}; {args.images} images = {megabytes:.1f} MB, best of {args.repeats}")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)

        def npy(sync: bool) -> None:
            with open(tmp / "x.npy", "wb") as handle:
                np.save(handle, images)
                np.save(handle, labels)
                if sync:
                    handle.flush()
                    os.fsync(handle.fileno())

        t_ours = best_of(args.repeats, lambda: shards.write_imageset(tmp / "shard-00000.h5", images, labels))
        t_npy_sync = best_of(args.repeats, lambda: npy(True))
        t_npy = best_of(args.repeats, lambda: npy(False))
        print("\n| write | MB/s | ratio to np.save+fsync |\n|---|---|---|")
        for name, t in [("shards.write_imageset (sha256+fsync+rename)", t_ours),
                        ("np.save + fsync", t_npy_sync), ("np.save (page cache only)", t_npy)]:
            print(f"| {name} | {megabytes / t:.0f} | {t_npy_sync / t:.2f}x |")

        np.save(tmp / "images.npy", images)
        mapped = np.load(tmp / "images.npy", mmap_mode="r")
        singles = rng.integers(0, args.images, args.reads)
        batches = [np.sort(rng.choice(args.images, 128, replace=False)) for _ in range(max(1, args.reads // 128))]
        offsets = rng.integers(0, args.images - 128, len(batches))
        n_batch = len(batches) * 128

        def patterns(data) -> dict[str, tuple[int, object]]:
            """Access patterns of a training loader: (images read, function)."""
            return {
                "random row": (args.reads, lambda: [np.array(data[i]) for i in singles]),
                "random 128, fancy index": (n_batch, lambda: [np.array(data[b]) for b in batches]),
                "random 128, row by row": (n_batch, lambda: [np.stack([data[i] for i in b]) for b in batches]),
                "128-row slice": (n_batch, lambda: [np.array(data[o:o + 128]) for o in offsets]),
                "whole shard": (args.images, lambda: np.array(data[:])),
            }

        base = {name: best_of(args.repeats, fn) for name, (_, fn) in patterns(mapped).items()}
        names = list(base)
        print("\nimg/s by access pattern (ratio to the memory-mapped .npy in brackets):\n")
        print("| layout | file MB | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
        counts = {name: count for name, (count, _) in patterns(mapped).items()}
        print(f"| .npy memory map (baseline) | {(tmp / 'images.npy').stat().st_size / 1e6:.1f} | "
              + " | ".join(f"{counts[k] / base[k]:,.0f}" for k in names) + " |")
        for rows in (1, 16, 64, 256, None):
            path = tmp / f"chunk-{rows}.h5"
            with h5py.File(path, "w") as h5:
                h5.create_dataset("images", data=images, chunks=(rows, 32, 32, 3) if rows else None)
            with h5py.File(path, "r") as h5:
                timed = {name: best_of(args.repeats, fn) for name, (_, fn) in patterns(h5["images"]).items()}
            label = (f"HDF5 chunk {rows} rows" + (" (ours)" if rows == shards.CHUNK_ROWS else "")) if rows \
                else "HDF5 contiguous"
            print(f"| {label} | {path.stat().st_size / 1e6:.1f} | "
                  + " | ".join(f"{counts[k] / timed[k]:,.0f} ({base[k] / timed[k]:.2f}x)" for k in names) + " |")
        del mapped


if __name__ == "__main__":
    main()
