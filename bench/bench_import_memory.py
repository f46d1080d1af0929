"""Peak memory of importing N generated images into shards: N = 10k vs N = 1M from a generated .npy.

    python bench/bench_import_memory.py [--sizes 10000 1000000] [--shard-size 10000] [--dir SCRATCH]
        [--format npy|npz|npz-compressed]

For each N, writes a .npy of N uint8 32x32x3 images (+ labels) through np.lib.format.open_memmap
(never whole in RAM), then runs the real CLIs in a child process each: `pipeline.train_generator
--generator import` (validates, hashes) and `pipeline.generate --shard all` (all shards in ONE
process, the worst case for memory). Peak RSS of each child is GNU time's "Maximum resident set
size" (/usr/bin/time -v).
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
import zipfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
TIME = "/usr/bin/time"  # GNU time -v: "Maximum resident set size (kbytes)" of the command it runs


def make_source(directory: Path, n: int, block: int = 10000) -> Path:
    path = directory / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    base = np.random.default_rng(0).integers(0, 256, (block, 32, 32, 3), dtype=np.uint8)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        images[lo:hi] = base[: hi - lo]
        images[lo:hi, 0, 0, 0] = np.arange(lo, hi) % 251  # distinct rows
    images.flush()
    del images
    np.save(directory / "images_label.npy", np.arange(n) % 10)
    return path


def as_npz(npy: Path, compressed: bool) -> Path:
    """The same arrays as an .npz (members image, label), streamed from disk into the zip."""
    path = npy.with_suffix(".npz")
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=1 if compressed else None,
                         allowZip64=True) as archive:
        archive.write(npy, arcname="image.npy")
        archive.write(npy.with_name(npy.stem + "_label.npy"), arcname="label.npy")
    npy.unlink()
    return path


def run_child(module: str, args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of `python -m module args` in a fresh process."""
    # Measured through GNU time, a tiny parent: ru_maxrss survives fork+exec on Linux, so a child
    # forked straight from this process would report this process's RSS if that were larger.
    start = time.perf_counter()
    result = subprocess.run([TIME, "-v", sys.executable, "-m", module, *args], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{module} failed:\n{result.stderr[-3000:]}")
    peak = [line for line in result.stderr.splitlines() if "Maximum resident set size" in line][-1]
    return seconds, int(peak.split(":")[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 1000000])
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--format", choices=["npy", "npz", "npz-compressed"], default="npy")
    args = parser.parse_args()
    from pipeline import params as params_mod

    print(f"# {platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}; "
          f"{args.format} source, shard_size {args.shard_size}, all shards in one `--shard all` process")
    print("| N images | source GB | train_generator (validate+sha256) s | peak RSS MiB | "
          "generate --shard all s | img/s | peak RSS MiB | RSS ratio to smallest N |")
    print("|---|---|---|---|---|---|---|---|")
    base_rss = None
    for n in sorted(args.sizes):
        scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix=f"import-{n}-"))
        try:
            source = make_source(scratch, n)
            if args.format != "npy":
                source = as_npz(source, compressed=args.format == "npz-compressed")
            cfg = params_mod.preset("default")
            cfg["train_generator"]["import"]["path"] = str(source)
            cfg["generate"].update(generators=["import"], n_images=n, shard_size=args.shard_size)
            params_path = scratch / "params.yaml"
            params_path.write_text(yaml.safe_dump(params_mod.validate(cfg)))
            model = scratch / "model.pt"
            t_train, rss_train = run_child("pipeline.train_generator", [
                "--params", str(params_path), "--generator", "import", "--workdir", str(scratch / "work"),
                "--out", str(model)])
            t_gen, rss_gen = run_child("pipeline.generate", [
                "--params", str(params_path), "--generator", "import", "--model", str(model),
                "--shard", "all", "--out-dir", str(scratch / "shards")])
            shards_written = len(list((scratch / "shards").glob("shard-*.h5")))
            assert shards_written == -(-n // args.shard_size), shards_written
            base_rss = base_rss or rss_gen
            print(f"| {n:,} | {source.stat().st_size / 1e9:.2f} | {t_train:.1f} | {rss_train:.0f} | "
                  f"{t_gen:.1f} | {n / t_gen:.0f} | {rss_gen:.0f} | {rss_gen / base_rss:.2f}x |", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
