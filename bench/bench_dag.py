"""How long Snakemake takes to plan the DAG as the number of shards grows (`snakemake -n`).

    python bench/bench_dag.py [--shards 10 100 1000]

Runs in a temporary copy of the workflow with generate.n_images = shards * shard_size. Reports the
dry-run wall time per shard count and the ratio to the smallest count, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def dry_run_seconds(shards: int, generators: list[str]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(REPO / "Snakefile", work / "Snakefile")
        for name in ["rules", "profiles"]:
            shutil.copytree(REPO / name, work / name)
        (work / "data").mkdir()
        (work / "data" / "demo").symlink_to(REPO / "data" / "demo")
        cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
        cfg["generate"].update(generators=generators, shard_size=1000, n_images=shards * 1000)
        (work / "params.yaml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        start = time.perf_counter()
        result = subprocess.run([str(BIN / "snakemake"), "-n", "--quiet", "rules"], cwd=work, env=env,
                                capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - start
        counts = {line.split()[0]: int(line.split()[-1]) for line in result.stdout.splitlines()
                  if line.strip().startswith(("generate ", "pseudolabel "))}  # the stats table repeats
        jobs = sum(counts.values())
        return elapsed, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--generators", nargs="+", default=["gaussian"])
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| shards | shard jobs (generate + pseudolabel) | `snakemake -n` s | ratio to first |")
    print("|---|---|---|---|")
    base = None
    for shards in args.shards:
        seconds, jobs = dry_run_seconds(shards, args.generators)
        base = base or seconds
        print(f"| {shards} | {jobs} | {seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
