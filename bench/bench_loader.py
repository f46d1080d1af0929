"""Mixed loader: images/s vs an in-memory numpy baseline, and peak RSS at 10k vs 1M generated images.

    OMP_NUM_THREADS=1 python bench/bench_loader.py --dir /tmp/bench_loader [--workers 4] [--batch 1024]
        [--sizes 10000 1000000] [--keep]

Writes synthetic image sets (random uint8, labels in the shards; 100 shards of 10k = ~3 GB for 1M)
under --dir, deletes them at the end unless --keep. For each size, a fresh subprocess streams batches
(70% generated, crop + flip) through the DataLoader with `--workers` workers and reports images/s and
peak RSS of the main process plus all workers (sampled from /proc every 50 ms). The baseline, in the
same run, is the same augmentation over a numpy array already in RAM, random indices, same workers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SHARD = 10_000


def write_sets(root: Path, n_generated: int, n_real: int = 50_000) -> tuple[Path, Path]:
    from pipeline.shards import write_imageset
    rng = np.random.default_rng(0)
    real = root / "real.h5"
    if not real.exists():
        write_imageset(real, rng.integers(0, 256, (n_real, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, n_real))
    gen = root / f"gen-{n_generated}"
    for i in range(n_generated // SHARD):
        path = gen / f"shard-{i:05d}.h5"
        if not path.exists():
            write_imageset(path, rng.integers(0, 256, (SHARD, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, SHARD))
    return real, gen


def tree_rss() -> int:
    """RSS in bytes of this process and its children (DataLoader workers)."""
    import psutil
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class InMemory:
    """Baseline: the same augmentation over arrays in RAM, random indices per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch: int) -> None:
        self.images, self.labels, self.batch = images, labels, batch

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int):
        import torch

        from pipeline import augment
        rng = np.random.default_rng(step)
        idx = rng.integers(0, len(self.images), self.batch)
        images = augment.crop_flip(self.images[idx], augment.crop_flip_params(rng, self.batch))
        return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                torch.from_numpy(self.labels[idx]))


def measure(kind: str, real: Path, gen: Path, workers: int, batch: int, steps: int) -> dict:
    """Run in a subprocess: images/s and peak RSS of one loader."""
    from pipeline import loader
    if kind == "in_memory":
        from pipeline.shards import read_imageset
        images, labels = read_imageset(real, verify=False)
        ds = InMemory(images, labels, batch)
    else:
        n_gen = loader.split_batch(batch, 0.7)[1]
        ds = loader.MixedBatches(loader.pool([real]), loader.pool([gen]), loader.BatchSpec(batch, n_gen, 0))
    with PeakRSS() as rss:
        it = iter(loader.loader(ds, 0, steps + 2 * workers, workers))
        for _ in range(2 * workers):   # warm-up: workers started, files opened
            next(it)
        start = time.perf_counter()
        n = 0
        for images, *_ in it:
            n += len(images)
        elapsed = time.perf_counter() - start
    return {"kind": kind, "images_per_s": n / elapsed, "peak_rss_mb": rss.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_loader"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "REAL", "GEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, real, gen = args.child
        print(json.dumps(measure(kind, Path(real), Path(gen), args.workers, args.batch, args.steps)))
        return
    import h5py
    import torch
    print(f"# {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"h5py {h5py.__version__}, numpy {np.__version__}; {args.workers} workers, batch {args.batch}, "
          f"70% generated, crop+flip")
    try:
        rows = []
        for size in args.sizes:
            t = time.perf_counter()
            real, gen = write_sets(args.dir, size)
            print(f"# wrote {size} generated images in {time.perf_counter() - t:.0f} s", flush=True)
            for kind in (["in_memory"] if size == args.sizes[0] else []) + ["mixed"]:
                out = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--batch",
                                      str(args.batch), "--steps", str(args.steps), "--child", kind, str(real),
                                      str(gen)],
                                     capture_output=True, text=True, check=True)
                row = {"n_generated": size, **json.loads(out.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(json.dumps(row), flush=True)
        base = next(r for r in rows if r["kind"] == "in_memory")
        small = next(r for r in rows if r["kind"] == "mixed")
        print("| loader | generated images | images/s | ratio to in-memory | peak RSS MB | RSS ratio to smallest |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['n_generated']} | {r['images_per_s']:.0f} | "
                  f"{r['images_per_s'] / base['images_per_s']:.2f}x | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_rss_mb'] / small['peak_rss_mb']:.2f}x |")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
