"""Stage `generate`: sample a generator into HDF5 shards, one shard per job; and the sample grid PNG.

    python -m pipeline.generate --params params.yaml --generator ddpm \
        --model models/generators/ddpm/model.pt --shard 00007 --out-dir data/generated/ddpm   # shard-00007.h5
    python -m pipeline.generate --params params.yaml --generator ddpm \
        --model models/generators/ddpm/model.pt --shard all --out-dir data/generated/ddpm
    python -m pipeline.generate grid --shard data/generated/ddpm/shard-00000.h5 \
        --out results/figures/samples_ddpm.png --n 100

Shard i holds global image indices [i * shard_size, min((i+1) * shard_size, n_images)). Every image
is a function of (checkpoint, base.seed, generator, index) alone, so Snakemake's one-job-per-shard
form and DVC's `--shard all` form write byte-identical files, in any order, on any machine of the same
kind. Of the same kind only: CUDA kernels round differently from the CPU's and from one GPU type to
another, so a shard records the `device` it was sampled on (provenance, not identity: `--shard all`
keeps a verified shard made elsewhere). (For ddpm and edm, network calls are tiles of
`generate.batch_size` images aligned to index multiples: float rounding depends on the batch shape, so
batch_size is part of such a shard's identity and is stored with it; gaussian, import and oracle bytes do not
depend on it.) Shards are written atomically, with a
checksum and provenance attributes; `--shard all` keeps existing shards that verify and match.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import generators, shards
from pipeline import params as params_mod
from pipeline.config import GenerateConfig
from pipeline.generators import Sampler, SampleSettings
from pipeline.models import describe_device, resolve_device

log = logging.getLogger("pipeline.generate")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def versions() -> dict[str, str]:
    return {pkg: importlib.metadata.version(pkg) for pkg in ("robustgen", "torch", "diffusers", "numpy")}


def generate_shard(sampler: Sampler, start: int, stop: int, batch_size: int, out: Path,
                   attrs: dict[str, Any], progress: bool = True) -> str:
    """Sample indices [start, stop) batch by batch and write them as one atomic shard; return its hash."""
    images = np.empty((stop - start, 32, 32, 3), np.uint8)
    labels = np.empty(stop - start, np.int64)
    bar = tqdm(total=stop - start, desc=out.name, unit="img", disable=not progress, mininterval=5)
    lo = start - start % batch_size  # batches aligned to index multiples, like the samplers' tiles
    for batch_start in range(lo, stop, batch_size):
        a, b = max(start, batch_start), min(stop, batch_start + batch_size)
        images[a - start:b - start], labels[a - start:b - start] = sampler.sample(a, b)
        bar.update(b - a)
    bar.close()
    return shards.write_imageset(out, images, labels, attrs)


def shard_attrs(name: str, checkpoint_sha: str, settings: SampleSettings, sampler: Sampler,
                start: int, stop: int, device: torch.device) -> dict[str, Any]:
    """Provenance stored beside the checksum: everything the bytes depend on, the software and the device."""
    return {"generator": name, "checkpoint_sha256": checkpoint_sha, "seed": settings.seed,
            "index_start": start, "index_stop": stop, **sampler.provenance(), "versions": versions(),
            "device": describe_device(device)}


PROVENANCE_ONLY = ("versions", "device")   # recorded, but a shard made with others is still kept


def _matches(path: Path, attrs: dict[str, Any]) -> bool:
    """An existing shard is kept only if it verifies and was made the same way."""
    try:
        found = shards.read_attrs(path)
        same = all(found.get(k) == v for k, v in attrs.items() if k not in PROVENANCE_ONLY)
        return same and shards.verify_imageset(path) is not None
    except shards.ShardError as error:
        log.warning("%s: regenerating (%s)", path, error)
        return False


def run(cfg_all: dict[str, Any], name: str, model: Path, shard: str, out: Path | None,
        out_dir: Path | None) -> list[Path]:
    """Generate one shard (`shard` an index, written to `out`) or all of them into `out_dir`."""
    cfg = params_mod.section(GenerateConfig, cfg_all["generate"])
    settings = SampleSettings.from_params(cfg_all)
    count = params_mod.shard_count(cfg_all)
    if shard == "all":
        if out_dir is None:
            raise params_mod.ParamsError("--shard all needs --out-dir")
        jobs = [(i, out_dir / f"shard-{i:05d}.h5") for i in range(count)]
        existing = set(shards.expand([out_dir])) if out_dir.is_dir() else set()
        for stale in sorted(existing - {path for _, path in jobs}):
            log.info("%s: removed (not a shard of the current params)", stale)  # readers glob the dir
            stale.unlink()
    else:
        if (out is None and out_dir is None) or not shard.isdigit():
            raise params_mod.ParamsError("--shard INDEX needs --out or --out-dir (or use --shard all --out-dir DIR)")
        jobs = [(int(shard), out or out_dir / f"shard-{int(shard):05d}.h5")]   # type: ignore[operator]
    checkpoint_sha = shards.file_sha256(model)
    device = resolve_device(cfg_all["base"]["device"])
    sampler = generators.load(name, model, settings, device)
    available = getattr(sampler, "n", None)  # an imported set or the oracle's pool has a fixed size
    if available is not None and available < cfg.n_images:
        raise params_mod.ParamsError(f"generate.n_images: {cfg.n_images} asked, but {name} model {model} holds "
                                     f"only {available} images")
    written = []
    for index, path in tqdm(jobs, desc=f"{name} shards", unit="shard", disable=len(jobs) == 1):
        start, stop = params_mod.shard_range(cfg_all, index)
        attrs = shard_attrs(name, checkpoint_sha, settings, sampler, start, stop, device)
        if shard == "all" and path.exists() and _matches(path, attrs):
            log.info("%s: up to date", path)
        else:
            checksum = generate_shard(sampler, start, stop, cfg.batch_size, path, attrs)
            log.info("%s: images %d..%d, sha256 %s", path, start, stop - 1, checksum[:12])
        written.append(path)
    return written


def sample_grid(shard: Path, out: Path, n: int) -> None:
    """A PNG of the first `n` images of a shard; one row per class when the labels are known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = shards.read_imageset(shard)
    attrs = shards.read_attrs(shard)
    labelled = bool(len(labels)) and (labels >= 0).all()
    if labelled:
        cols = max(1, math.ceil(n / 10))
        rows = [images[labels == k][:cols] for k in range(10)]
        row_names = [CIFAR10_CLASSES[k] for k in range(10)]
    else:
        cols = max(1, math.ceil(math.sqrt(n)))
        picked = images[:n]
        rows = [picked[i:i + cols] for i in range(0, len(picked), cols)]
        row_names = ["" for _ in rows]
    grid = np.full((len(rows) * 34, cols * 34, 3), 255, np.uint8)  # 2-pixel white gutters
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[r * 34 + 1:r * 34 + 33, c * 34 + 1:c * 34 + 33] = image
    fig, ax = plt.subplots(figsize=(1.6 + cols * 0.5, 0.4 + len(rows) * 0.5), dpi=120)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * 34 + 17 for r in range(len(rows))], row_names if labelled else [])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    steps = attrs.get("steps", 0)
    title = f"{attrs.get('generator', '?')} ({attrs.get('sampler', '?')}" + (f", {steps} steps)" if steps > 1 else ")")
    ax.set_title(title + ("" if labelled else ", unlabelled"), fontsize=9)
    fig.tight_layout()
    with shards.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def grid_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.generate grid",
                                     description="sample grid PNG of one shard")
    parser.add_argument("--shard", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, required=True, help="images in the grid (generate.grid_images)")
    args = parser.parse_args(argv)
    try:
        sample_grid(args.shard, args.out, args.n)
    except shards.ShardError as error:
        raise SystemExit(f"error: {error}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grid"]:
        return grid_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--generator", required=True, choices=sorted(generators.GENERATORS))
    parser.add_argument("--model", type=Path, required=True, help="models/generators/{g}/model.pt")
    parser.add_argument("--shard", required=True, help="shard index, or `all`")
    parser.add_argument("--out", type=Path, help="shard file (with a shard index)")
    parser.add_argument("--out-dir", type=Path, help="shard directory: the shard's file in it, or every shard's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(params_mod.load(args.params), args.generator, args.model, args.shard, args.out, args.out_dir)
    except (params_mod.ParamsError, generators.imported.SourceError, shards.ShardError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
