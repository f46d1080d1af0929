"""How the exact blocked 1-NN search of the complementarity analysis grows with N (samples per set).

    OMP_NUM_THREADS=2 python bench/bench_analysis.py [--dims 64 3072] [--sizes 1000 2000 5000 10000]

Times `pipeline.analysis.complementarity_coverage` (7 exact searches: 3 from the generated set, 2 each
from train and test) on random unit-normalised features; 64 dims = small_cnn penultimate features,
3072 = pixels. Ratios are against the smallest N measured in the same run; ideal quadratic growth is
(N / N0)^2. Feature extraction (linear in N) is not included.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from pipeline.analysis import complementarity_coverage
from pipeline.features import unit_normalise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 3072])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--block-size", type=int, default=1024)
    args = parser.parse_args()
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print("| dims | N per set | seconds | ratio to smallest N | (N/N0)^2 |")
    print("|---|---|---|---|---|")
    for dim in args.dims:
        base = None
        for n in args.sizes:
            rng = np.random.default_rng(0)
            sets = [unit_normalise(rng.standard_normal((n, dim)).astype(np.float32)) for _ in range(3)]
            start = time.perf_counter()
            complementarity_coverage(*sets, block_size=args.block_size)
            seconds = time.perf_counter() - start
            base = base or (seconds, n)
            print(f"| {dim} | {n} | {seconds:.2f} | {seconds / base[0]:.2f}x | {(n / base[1]) ** 2:.0f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
