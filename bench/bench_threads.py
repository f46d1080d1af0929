"""Two concurrent jobs on the same cores: torch with its default thread count vs each job capped at its share.

    python bench/bench_threads.py [--jobs 2] [--repeats 3] [--steps 6]

Each job is one process running the evaluation's inner loop (PGD-10 on a batch of 100 images of the
small CNN, `steps` times), the kind of work two concurrent Snakemake jobs do. Three settings, each
`repeats` times, alternating: one job alone with every core (the reference), `jobs` concurrent jobs with
torch's default threads (one per core each: what runs without OMP_NUM_THREADS), and `jobs` concurrent
jobs with OMP_NUM_THREADS = cores // jobs (what the rules' THREADS prefix gives them). Reports the median
wall seconds of one job in each setting and the ratios. Never used in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

WORK = """
import time, torch
from pipeline import models
from pipeline.attacks import robust_accuracy
torch.manual_seed(0)
model = models.build("small_cnn").eval()
x, y = torch.rand(100, 3, 32, 32), torch.randint(0, 10, (100,))
start = time.perf_counter()
for _ in range({steps}):
    robust_accuracy(model, x, y, "linf", 8 / 255, 10, 100)
print(time.perf_counter() - start)
"""


def run_jobs(n: int, threads: int | None, steps: int) -> list[float]:
    """Start n processes at once; each prints the seconds of its own loop."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
        if threads is not None:
            env[name] = str(threads)
    procs = [subprocess.Popen([sys.executable, "-c", WORK.format(steps=steps)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    share = max(1, cores // args.jobs)
    settings = {"alone, all cores": (1, None), f"{args.jobs} jobs, default threads": (args.jobs, None),
                f"{args.jobs} jobs, OMP_NUM_THREADS={share}": (args.jobs, share)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, (n, threads) in settings.items():
            times[name] += run_jobs(n, threads, args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    alone = medians["alone, all cores"]
    print(f"# {platform.machine()}, {cores} cores, Python {platform.python_version()}, "
          f"load {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| setting | median s per job | vs alone | vs capped |")
    print("|---|---:|---:|---:|")
    capped = medians[f"{args.jobs} jobs, OMP_NUM_THREADS={share}"]
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / alone:.2f}x | {value / capped:.2f}x |")
    print(json.dumps({"cores": cores, "medians": medians, "all": times}))


if __name__ == "__main__":
    main()
