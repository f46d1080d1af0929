"""Stage `analysis`: complementarity and coverage of each generator against real CIFAR-10.

    python -m pipeline.analysis --params params.yaml --generator {g} --train data/cifar10/train.h5 \
        --test data/cifar10/test.h5 --teacher models/teacher/model.pt --shards data/generated/{g} \
        --out results/analysis/{g}.json
    python -m pipeline.analysis --params params.yaml --generator mixup --train ... --test ... \
        --teacher ... --out results/analysis/mixup.json              # the paper's mixup baseline row
    python -m pipeline.analysis summary --inputs results/analysis/*.json \
        --out-csv results/complementarity.csv --out-figure results/figures/complementarity.png

The paper's conditions (2) and (3) (Gowal et al. 2021, complementarity table). With N samples drawn
(seeded) from each of train, test and the generated set, and exact 1-nearest-neighbour search on
features (pipeline/features.py):
- complementarity(train | test | self): share of generated samples whose nearest neighbour in
  train U test U (generated minus itself) lies in train, in test, or in the generated set; the three
  sum to 1, an ideal generator gives about a third each;
- coverage(train): share of train samples whose nearest neighbour in (train minus itself) U generated
  is generated; coverage(test) likewise with test; ideal is about 1/2.
Ties go to real data (train, then test, then generated), so a generator never gains from a tie. The
train and test samples do not depend on the generator, so rows are comparable. The mixup row is
standard mixup (Zhang et al., 2018) of the train sample itself (the train pool of the search): every
pool image once, blended with a partner from a random permutation of the pool, with weight
lambda ~ Beta(alpha, alpha): the row asks whether a blend's nearest neighbour
is one of its own source images, which it can only be when the sources are in the pool (drawn from
a whole training set of T images, a source would be in it with probability N / T: 4% in the study
preset, N = 2,000 of 49,500). How close blends come to the whole training set (memorisation) is a
question for quality metrics, not for this row.
The JSON also carries teacher statistics on the generated sample (class histogram, mean confidence,
agreement with the conditioning label where the generator knows it; for mixup, the dominant image's).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline import features as feat
from pipeline import models, seeding
from pipeline import params as params_mod
from pipeline.inference import predict
from pipeline.shards import ShardError, atomic_path, count, expand, read_imageset

log = logging.getLogger("pipeline.analysis")
MIXUP = "mixup"
CSV_COLUMNS = ["generator", "feature_space", "n_train", "n_test", "n_generated",
               "complementarity_train", "complementarity_test", "complementarity_self",
               "coverage_train", "coverage_test", "teacher_label_agreement", "teacher_mean_confidence"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Mirror of params.yaml `analysis:`."""
    n_samples: int          # images drawn from each of train, test and the generated set (all if fewer)
    feature_space: feat.FeatureSpace  # teacher (penultimate, default), pixels (diagnostic) or lpips (local weights)
    lpips_weights: str      # local LPIPS weights (file or folder) when feature_space is lpips
    mixup_alpha: float      # Beta(alpha, alpha) mixing weight of the mixup row (small: near one image)
    batch_size: int         # images per feature-extraction batch (memory only)
    block_size: int         # query rows per block of the exact search (memory: block x N floats)


# --- exact 1-NN in blocks ---------------------------------------------------------------------------


def min_sq_dist(queries: np.ndarray, pool: np.ndarray, block_size: int, exclude_self: bool = False,
                device: torch.device | str = "cpu", desc: str | None = None) -> np.ndarray:
    """Smallest squared L2 distance from each query to the pool, exact, `block_size` queries at a time.

    With `exclude_self`, queries and pool are the same set and each row skips itself (distance inf).
    """
    if exclude_self and queries is not pool and queries.shape != pool.shape:
        raise ValueError("exclude_self needs the pool to be the query set itself")
    q_all = torch.as_tensor(queries, dtype=torch.float32, device=device)
    p = torch.as_tensor(pool, dtype=torch.float32, device=device)
    p_sq = p.pow(2).sum(1)
    out = torch.empty(len(q_all), dtype=torch.float32)
    if len(p) == 0 or (exclude_self and len(p) == 1):
        return np.full(len(q_all), np.inf, dtype=np.float32)
    for start in tqdm(range(0, len(q_all), block_size), desc=desc, disable=desc is None, leave=False,
                      unit="block"):
        q = q_all[start:start + block_size]
        d = q.pow(2).sum(1, keepdim=True) + p_sq.unsqueeze(0) - 2.0 * (q @ p.T)
        if exclude_self:
            rows = torch.arange(len(q), device=d.device)
            d[rows, rows + start] = float("inf")
        out[start:start + len(q)] = d.min(dim=1).values.clamp_min(0).cpu()
    return out.numpy()


def complementarity_coverage(train: np.ndarray, test: np.ndarray, generated: np.ndarray, block_size: int,
                             device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """The paper's complementarity shares and coverage from feature matrices (rows = samples)."""
    desc = (lambda name: name) if progress else (lambda name: None)
    d_gen = np.stack([min_sq_dist(generated, train, block_size, device=device, desc=desc("gen->train")),
                      min_sq_dist(generated, test, block_size, device=device, desc=desc("gen->test")),
                      min_sq_dist(generated, generated, block_size, True, device, desc("gen->gen"))], axis=1)
    winner = np.argmin(d_gen, axis=1)  # first minimum: ties go to train, then test, then self
    shares = np.bincount(winner, minlength=3) / max(1, len(generated))
    coverage = {}
    for name, real in (("train", train), ("test", test)):
        d_real = min_sq_dist(real, real, block_size, True, device, desc(f"{name}->{name}"))
        d_new = min_sq_dist(real, generated, block_size, device=device, desc=desc(f"{name}->gen"))
        coverage[name] = float((d_new < d_real).mean()) if len(real) else 0.0  # strict: ties go to real
    return {"complementarity": {"train": float(shares[0]), "test": float(shares[1]), "self": float(shares[2])},
            "coverage": coverage}


# --- samples ----------------------------------------------------------------------------------------


def sample_indices(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct indices in [0, total), sorted (all of them when n >= total)."""
    if n >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=n, replace=False))


def read_rows(shard_files: list[Path], indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels at global `indices` (sorted) over the concatenation of `shard_files`.

    A shard mostly needed is read whole and checksum-verified; a few rows are read by index (no
    checksum then: the shard's own readers verified it when it was written and labelled).
    """
    sizes = np.array([count(f) for f in shard_files], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    images, labels = [], []
    for i, path in enumerate(shard_files):
        local = indices[(indices >= offsets[i]) & (indices < offsets[i + 1])] - offsets[i]
        if len(local) == 0:
            continue
        if len(local) * 4 >= sizes[i]:
            x, y = read_imageset(path, verify=True)
            images.append(x[local])
            labels.append(y[local])
        else:
            try:
                with h5py.File(path, "r") as h5:
                    images.append(h5["images"][local])
                    labels.append(h5["labels"][local])
            except (OSError, KeyError) as error:
                raise ShardError(f"{path}: unreadable rows ({error})") from None
    return np.concatenate(images), np.concatenate(labels)


def generated_sample(shards: list[Path], n: int, seed: int, generator: str) -> tuple[np.ndarray, np.ndarray]:
    files = expand(shards)
    if not files:
        raise ShardError(f"{' '.join(map(str, shards))}: no shard-*.h5 files for generator {generator}")
    total = sum(count(f) for f in files)
    idx = sample_indices(total, n, seeding.numpy_rng(seed, "analysis", "generated", generator))
    return read_rows(files, idx)


def train_pool_indices(n_train: int, n_samples: int, seed: int) -> np.ndarray:
    """The train sample: the train pool of the 1-NN search and the mixup row's source images."""
    return sample_indices(n_train, n_samples, seeding.numpy_rng(seed, "analysis", "train"))


def mixup_sample(train_x: np.ndarray, train_y: np.ndarray, pool: np.ndarray, alpha: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard mixup of `pool`: blends lam * x_i + (1 - lam) * x_j with i every pool image once and j a
    random permutation of the pool, lam ~ Beta(alpha, alpha).

    `pool` holds indices into train_x: the search's train pool, so that a blend's sources can be its
    nearest train neighbours. Returns float NHWC in [0, 1] (not re-quantised), the dominant image's
    label (lam >= 1/2 -> y_i) and the (n, 2) train indices (i, j) of the sources.
    """
    rng = seeding.numpy_rng(seed, "analysis", MIXUP)
    n = len(pool)
    i = np.asarray(pool)
    j = i[rng.permutation(n)]
    lam = rng.beta(alpha, alpha, size=n).astype(np.float32).reshape(-1, 1, 1, 1)
    mixed = (lam * train_x[i].astype(np.float32) + (1 - lam) * train_x[j].astype(np.float32)) / 255.0
    labels = np.where(lam.ravel() >= 0.5, train_y[i], train_y[j]).astype(np.int64)
    return mixed, labels, np.stack([i, j], axis=1)


# --- the stage --------------------------------------------------------------------------------------


def teacher_stats(model: torch.nn.Module, images: np.ndarray, conditioning: np.ndarray, batch_size: int,
                  device: torch.device, num_classes: int) -> dict[str, Any]:
    probs = predict(model, images, batch_size, device)
    label = probs.argmax(1)
    known = conditioning >= 0
    stats: dict[str, Any] = {"label_histogram": np.bincount(label, minlength=num_classes).tolist(),
                             "mean_confidence": float(probs.max(1).mean()), "n_known_labels": int(known.sum()),
                             "label_agreement": float((label[known] == conditioning[known]).mean())
                             if known.any() else None}
    return stats


def analyse(cfg: AnalysisConfig, seed: int, generator: str, train: tuple[np.ndarray, np.ndarray],
            test: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray],
            teacher: models.Classifier | None, device: torch.device) -> dict[str, Any]:
    """Sample train/test, extract features, search; `generated` is already the generated sample."""
    train_idx = train_pool_indices(len(train[0]), cfg.n_samples, seed)
    test_idx = sample_indices(len(test[0]), cfg.n_samples, seeding.numpy_rng(seed, "analysis", "test"))
    sets = {"train": train[0][train_idx], "test": test[0][test_idx], "generated": generated[0]}
    started = time.perf_counter()
    if cfg.feature_space == "teacher":
        if teacher is None:
            raise ValueError("analysis.feature_space teacher needs --teacher")
        vectors = {k: feat.teacher_features(teacher, v, cfg.batch_size, device, f"features {k}")
                   for k, v in sets.items()}
    elif cfg.feature_space == "pixels":
        vectors = {k: feat.pixel_features(v) for k, v in sets.items()}
    else:
        net = feat.load_lpips(Path(cfg.lpips_weights), device)
        vectors = {k: feat.lpips_features(net, v, cfg.batch_size, device, f"lpips {k}") for k, v in sets.items()}
    extracted = time.perf_counter()
    result = complementarity_coverage(vectors["train"], vectors["test"], vectors["generated"],
                                      cfg.block_size, device, progress=True)
    log.info("%s: features %.1f s, exact 1-NN search %.1f s (N = %d / %d / %d)", generator,
             extracted - started, time.perf_counter() - extracted, *(len(v) for v in sets.values()))
    out: dict[str, Any] = {
        "generator": generator, "feature_space": cfg.feature_space, "seed": seed,
        "n": {k: len(v) for k, v in sets.items()}, **result,
        "ideal": {"complementarity": 1 / 3, "coverage": 1 / 2},
    }
    if generator == MIXUP:
        out["mixup_alpha"] = cfg.mixup_alpha
    if teacher is not None:
        out["teacher"] = teacher_stats(teacher, generated[0], generated[1], cfg.batch_size, device,
                                       teacher.head.out_features)
    return out


def summary(inputs: list[Path], out_csv: Path, out_figure: Path) -> list[dict[str, Any]]:
    """One CSV row per generator and a stacked-bar figure of complementarity beside coverage."""
    rows = []
    for path in sorted(inputs, key=lambda p: (Path(p).stem == MIXUP, Path(p).stem)):
        result = json.loads(Path(path).read_text())
        teacher = result.get("teacher") or {}
        rows.append({"generator": result["generator"], "feature_space": result["feature_space"],
                     "n_train": result["n"]["train"], "n_test": result["n"]["test"],
                     "n_generated": result["n"]["generated"],
                     **{f"complementarity_{k}": round(v, 4) for k, v in result["complementarity"].items()},
                     **{f"coverage_{k}": round(v, 4) for k, v in result["coverage"].items()},
                     "teacher_label_agreement": "" if teacher.get("label_agreement") is None
                     else round(teacher["label_agreement"], 4),
                     "teacher_mean_confidence": "" if not teacher else round(teacher["mean_confidence"], 4)})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out_csv) as tmp:
        tmp.write_text(text.getvalue())
    _figure(rows, out_figure)
    return rows


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["generator"] for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 3.6))
    bottom = np.zeros(len(rows))
    for part, colour in (("train", "#4c72b0"), ("test", "#55a868"), ("self", "#c44e52")):
        values = np.array([r[f"complementarity_{part}"] for r in rows]) * 100
        left.bar(x, values, bottom=bottom, color=colour, label=part)
        bottom += values
    left.axhline(100 / 3, color="k", lw=0.6, ls=":")
    left.axhline(200 / 3, color="k", lw=0.6, ls=":")
    left.set(xticks=x, xticklabels=names, ylabel="% of generated samples", ylim=(0, 100),
             title="complementarity (nearest neighbour in)")
    left.legend(fontsize=8, loc="upper right")
    width = 0.38
    for k, (part, colour) in enumerate((("train", "#4c72b0"), ("test", "#55a868"))):
        right.bar(x + (k - 0.5) * width, [r[f"coverage_{part}"] * 100 for r in rows], width,
                  color=colour, label=part)
    right.axhline(50, color="k", lw=0.6, ls=":")
    right.set(xticks=x, xticklabels=names, ylabel="% of real samples", ylim=(0, 100), title="coverage")
    right.legend(fontsize=8, loc="upper right")
    space = rows[0]["feature_space"] if rows else ""
    fig.suptitle(f"1-NN in {space} feature space (dotted: ideal)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv[:1] == ["summary"]:
        parser = argparse.ArgumentParser(prog="python -m pipeline.analysis summary",
                                         description="results/analysis/*.json -> CSV table and figure")
        parser.add_argument("--params", type=Path, help="accepted for uniformity; not read")
        parser.add_argument("--inputs", type=Path, nargs="+", required=True)
        parser.add_argument("--out-csv", type=Path, required=True)
        parser.add_argument("--out-figure", type=Path, required=True)
        args = parser.parse_args(argv[1:])
        # Snakemake passes the JSON files, DVC the results/analysis folder: both reach the same list
        inputs = [f for p in args.inputs for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
        rows = summary(inputs, args.out_csv, args.out_figure)
        log.info("wrote %s (%d rows) and %s", args.out_csv, len(rows), args.out_figure)
        return
    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--generator", required=True, help=f"generator name, or {MIXUP} for the baseline")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="teacher model.pt (features and label statistics)")
    parser.add_argument("--shards", type=Path, nargs="*", default=[], help="shard folder or files")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(AnalysisConfig, cfg_all["analysis"])
    seed = cfg_all["base"]["seed"]
    device = models.resolve_device(cfg_all["base"]["device"])
    if cfg.feature_space == "teacher" and args.teacher is None:
        parser.error("analysis.feature_space is teacher: --teacher is required")
    if (args.generator == MIXUP) == bool(args.shards):
        parser.error(f"--shards is required for a generator and not allowed for {MIXUP}")
    try:
        train, test = read_imageset(args.train), read_imageset(args.test)
        if args.generator == MIXUP:
            # Blends of the train pool that analyse() searches (same indices), one per pool image,
            # so the three sets weigh the same.
            pool = train_pool_indices(len(train[0]), cfg.n_samples, seed)
            generated = mixup_sample(*train, pool, cfg.mixup_alpha, seed)[:2]
        else:
            generated = generated_sample(args.shards, cfg.n_samples, seed, args.generator)
        teacher = models.load_checkpoint(args.teacher, device) if args.teacher else None
        result = analyse(cfg, seed, args.generator, train, test, generated, teacher, device)
    except (ShardError, feat.FeatureError) as error:
        raise SystemExit(f"error: {error}") from None
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s: complementarity %s, coverage %s", args.out,
             {k: round(v, 3) for k, v in result["complementarity"].items()},
             {k: round(v, 3) for k, v in result["coverage"].items()})


if __name__ == "__main__":
    main()
