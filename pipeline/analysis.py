"""Stage `analysis`: complementarity and coverage of each generator against real CIFAR-10, and the
quality of the generated data itself (FID, IS, KID, precision/recall, density/coverage, per-class FID,
test-set leakage and memorisation).

    python -m pipeline.analysis --params params.yaml --generator {g} --train data/cifar10/train.h5 \
        --test data/cifar10/test.h5 --teacher models/teacher/model.pt --shards data/generated/{g} \
        --labels data/pseudolabels/{g} --out results/analysis/{g}.json \
        --out-figure results/figures/quality_{g}.png
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
preset, N = 2,000 of 49,500). How close blends come to the whole training set (memorisation) is
measured by the quality block below.
The JSON also carries teacher statistics on the generated sample (class histogram, mean confidence,
agreement with the conditioning label where the generator knows it; for mixup, the dominant image's).

Quality (pipeline/quality.py, the JSON's `quality`): `analysis.quality_n` generated images (seeded, their
own draw) against `quality_n` training images, in Inception-v3 pool3 features when
`analysis.inception_weights` names a local file, else in the teacher's features (`quality.feature_space`
says which; every number is in that space). The whole real test set is scored the same way as a
reference "generator" (`quality.reference_test`): the training set's own held-out split, the value a
perfect generator would reach. Per-class FID groups generated images by the teacher's pseudo-label (the
`--labels` sidecars; the teacher's prediction on the sample for mixup) and, where shards carry one, by
the conditioning class; the pseudo-label and confidence histograms cover the whole generated set when the
sidecars are given. Leakage: generated images nearer a test image (memorisation: a train image) than
the calibrated near-duplicate threshold, in pixels and in features, with their generated-set indices
(rows of the shards concatenated in order) and a figure of the closest pairs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pipeline import features as feat
from pipeline import models, seeding
from pipeline import params as params_mod
from pipeline import quality as q
from pipeline.config import AnalysisConfig
from pipeline.inference import predict
from pipeline.labels import load_labels
from pipeline.quality import complementarity_coverage
from pipeline.shards import ShardError, atomic_path, count, expand, read_imageset

log = logging.getLogger("pipeline.analysis")
MIXUP = "mixup"
REFERENCE = "test_set"   # the summary's reference row: the real test set scored as a generator
CONFIDENCE_BINS = 20     # teacher-confidence histogram: equal bins over [0, 1]
PAIRS_SHOWN = 8          # closest generated/test and generated/train pairs in the figure
CSV_COLUMNS = ["generator", "feature_space", "n_train", "n_test", "n_generated",
               "complementarity_train", "complementarity_test", "complementarity_self",
               "coverage_train", "coverage_test", "teacher_label_agreement", "teacher_mean_confidence",
               "quality_feature_space", "quality_n_generated", "quality_n_train", "fid", "fid_reference",
               "inception_score", "kid", "precision", "recall", "density", "nn_coverage",
               "leak_test_pixels", "leak_test_features", "memorised_pixels", "memorised_features"]


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


def shard_files(shards: list[Path], generator: str) -> list[Path]:
    files = expand(shards)
    if not files:
        raise ShardError(f"{' '.join(map(str, shards))}: no shard-*.h5 files for generator {generator}")
    return files


def generated_rows(files: list[Path], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global indices, images, conditioning labels) of n rows drawn from the concatenated shards."""
    idx = sample_indices(sum(count(f) for f in files), n, rng)
    return (idx, *read_rows(files, idx))


def generated_sample(shards: list[Path], n: int, seed: int, generator: str) -> tuple[np.ndarray, np.ndarray]:
    """The complementarity sample of a generator's set."""
    rng = seeding.numpy_rng(seed, "analysis", "generated", generator)
    return generated_rows(shard_files(shards, generator), n, rng)[1:]


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


# --- pseudo-labels of the quality sample ------------------------------------------------------------


def label_histograms(labels: np.ndarray, confidence: np.ndarray, num_classes: int, source: str) -> dict[str, Any]:
    counts, edges = np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    return {"source": source, "n": int(len(labels)),
            "histogram": np.bincount(labels, minlength=num_classes).tolist(),
            "confidence_edges": [round(float(e), 4) for e in edges], "confidence_counts": counts.tolist(),
            "mean_confidence": float(confidence.mean()) if len(confidence) else None}


def sidecar_labels(files: list[Path], label_dir: list[Path], indices: np.ndarray,
                   num_classes: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Pseudo-labels of the rows at global `indices`, and label/confidence histograms of the whole set.

    Each sidecar is checked against its shard (pipeline.labels.load_labels) and read one at a time.
    """
    sidecars = {p.name: p for p in expand(label_dir)}
    labels, all_labels, all_conf = [], [], []
    offset, confidence_sum = 0, 0.0
    for shard in files:
        if shard.name not in sidecars:
            raise ShardError(f"{' '.join(map(str, label_dir))}: no pseudo-label sidecar {shard.name} for {shard}")
        arrays = load_labels(shard, sidecars[shard.name])
        # the teacher's own label and confidence (`label` is the generator's class where the sidecar was
        # written with pseudolabel.label_source generator)
        label = arrays.get("teacher_label", arrays["label"])
        confidence = arrays.get("teacher_confidence", arrays["confidence"])
        n = len(label)
        labels.append(label[indices[(indices >= offset) & (indices < offset + n)] - offset])
        all_labels.append(np.bincount(label, minlength=num_classes))
        all_conf.append(np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0])
        confidence_sum += float(confidence.astype(np.float64).sum())
        offset += n
    summary = label_histograms(np.zeros(0, dtype=np.int64), np.zeros(0), num_classes, "pseudolabel sidecars")
    summary.update(n=offset, histogram=np.sum(all_labels, axis=0).tolist(),
                   confidence_counts=np.sum(all_conf, axis=0).tolist(),
                   mean_confidence=confidence_sum / offset if offset else None)
    return np.concatenate(labels), summary


def teacher_labels(teacher: models.Classifier, images: np.ndarray, batch_size: int,
                   device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """The teacher's labels of the sample itself (mixup, or no sidecars given)."""
    probs = predict(teacher, images, batch_size, device)
    labels = probs.argmax(1).astype(np.int64)
    return labels, label_histograms(labels, probs.max(1), probs.shape[1], "teacher on the quality sample")


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


# --- quality ----------------------------------------------------------------------------------------


Embedder = Callable[[np.ndarray, str], q.Embedding]


def embedder(cfg: AnalysisConfig, teacher: models.Classifier | None,
             device: torch.device) -> tuple[q.QualitySpace, Embedder]:
    """Inception-v3 (local weights) when analysis.inception_weights is set, else the teacher's features."""
    if cfg.inception_weights:
        net = q.load_inception(Path(cfg.inception_weights), device)
        return "inception", lambda x, name: q.inception_embedding(net, x, cfg.batch_size, device, f"inception {name}")
    if teacher is None:
        raise ValueError("quality metrics need analysis.inception_weights or --teacher")
    return "teacher", lambda x, name: q.teacher_embedding(teacher, x, cfg.batch_size, device, f"teacher {name}")


@dataclass(frozen=True)
class QualityInput:
    """The generated quality sample: images, generated-set ids, conditioning (-1 unknown), pseudo-labels."""
    images: np.ndarray
    ids: np.ndarray
    conditioning: np.ndarray
    labels: np.ndarray
    label_summary: dict[str, Any]


def quality(cfg: AnalysisConfig, seed: int, space: q.QualitySpace, embed: Embedder,
            train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], gen: QualityInput,
            num_classes: int, device: torch.device) -> tuple[dict[str, Any], q.Pairs, np.ndarray]:
    """The JSON's `quality` block, the pixel-space nearest pairs and the train sample's indices."""
    started = time.perf_counter()
    train_idx = sample_indices(len(train[0]), cfg.quality_n, seeding.numpy_rng(seed, "analysis", "quality", "train"))
    real_train, train_y = embed(train[0][train_idx], "train"), train[1][train_idx]
    real_test, generated = embed(test[0], "test"), embed(gen.images, "generated")
    extracted = time.perf_counter()
    k, block = cfg.quality_k, cfg.block_size
    known = gen.conditioning >= 0
    out: dict[str, Any] = {
        "feature_space": space, "feature_label": q.SPACE_LABELS[space], "k": k,
        "n": {"generated": len(gen.images), "train": len(train_idx), "test": len(test[0])},
        "generated": q.set_metrics(generated, real_train, k, block, device),
        "reference_test": q.set_metrics(real_test, real_train, k, block, device),
        "per_class": {"by": "teacher pseudo-label",
                      **q.per_class_fid(generated.features, gen.labels, real_train.features, train_y, num_classes)},
        "per_class_reference": q.per_class_fid(real_test.features, test[1], real_train.features, train_y,
                                               num_classes),
        "per_class_conditioning": q.per_class_fid(generated.features[known], gen.conditioning[known],
                                                  real_train.features, train_y, num_classes) if known.any() else None,
        "labels": gen.label_summary,
    }
    pixels = {"generated": q.pixel_vectors(gen.images), "test": q.pixel_vectors(test[0]),
              "train": q.pixel_vectors(train[0][train_idx])}
    out["leakage"], pairs = q.leakage(
        {"pixels": pixels["generated"], "features": generated.features},
        {"pixels": pixels["test"], "features": real_test.features},
        {"pixels": pixels["train"], "features": real_train.features}, cfg.leakage_quantile,
        {"generated": gen.ids, "test": np.arange(len(test[0])), "train": train_idx}, block, device)
    log.info("quality (%s): features %.1f s, metrics %.1f s; FID %.3f (test set %.3f)", space,
             extracted - started, time.perf_counter() - extracted, out["generated"]["fid"] or float("nan"),
             out["reference_test"]["fid"] or float("nan"))
    return out, pairs, train_idx


def _round(value: Any, digits: int = 4) -> Any:
    return "" if value is None else round(float(value), digits)


def _sig(value: Any) -> Any:
    """6 significant digits: distances' scale depends on the feature space (teacher FIDs can be 1e-3)."""
    return "" if value is None else float(f"{float(value):.6g}")


def quality_columns(block: dict[str, Any] | None, metrics: str = "generated") -> dict[str, Any]:
    """The CSV's quality columns from a JSON's `quality` block (blank when there is none)."""
    if not block:
        return dict.fromkeys(CSV_COLUMNS[CSV_COLUMNS.index("quality_feature_space"):], "")
    m = block[metrics]
    leak = block.get("leakage") if metrics == "generated" else None
    share = (lambda space, pool: _round(leak[space][pool]["share"])) if leak else (lambda space, pool: "")
    return {"quality_feature_space": block["feature_space"], "quality_n_generated": m["n"],
            "quality_n_train": m["n_real"], "fid": _sig(m["fid"]),
            "fid_reference": _sig(block["reference_test"]["fid"]), "inception_score": _sig(m["is_mean"]),
            "kid": _sig(m["kid_mean"]), "precision": _round(m["precision"]), "recall": _round(m["recall"]),
            "density": _round(m["density"]), "nn_coverage": _round(m["coverage"]),
            "leak_test_pixels": share("pixels", "test"), "leak_test_features": share("features", "test"),
            "memorised_pixels": share("pixels", "train"), "memorised_features": share("features", "train")}


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    teacher = result.get("teacher") or {}
    return {"generator": result["generator"], "feature_space": result["feature_space"],
            "n_train": result["n"]["train"], "n_test": result["n"]["test"], "n_generated": result["n"]["generated"],
            **{f"complementarity_{k}": round(v, 4) for k, v in result["complementarity"].items()},
            **{f"coverage_{k}": round(v, 4) for k, v in result["coverage"].items()},
            "teacher_label_agreement": "" if teacher.get("label_agreement") is None
            else round(teacher["label_agreement"], 4),
            "teacher_mean_confidence": "" if not teacher else round(teacher["mean_confidence"], 4),
            **quality_columns(result.get("quality"))}


def summary(inputs: list[Path], out_csv: Path, out_figure: Path) -> list[dict[str, Any]]:
    """One CSV row per generator, a reference row (the real test set scored as a generator in the same
    feature space) and a figure: complementarity, coverage and FID."""
    rows = []
    reference = None
    for path in sorted(inputs, key=lambda p: (Path(p).stem == MIXUP, Path(p).stem)):
        result = json.loads(Path(path).read_text())
        rows.append(summary_row(result))
        reference = reference or result.get("quality")
    if reference:   # the same train and test samples in every JSON: the first one's reference stands for all
        rows.append({**dict.fromkeys(CSV_COLUMNS, ""), "generator": REFERENCE,
                     "n_test": reference["n"]["test"], "n_generated": reference["n"]["test"],
                     **quality_columns(reference, "reference_test")})
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

    searched = [r for r in rows if r["generator"] != REFERENCE]
    names = [r["generator"] for r in searched]
    x = np.arange(len(searched))
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(6 + 2.2 * len(searched), 3.6))
    bottom = np.zeros(len(searched))
    for part, colour in (("train", "#4c72b0"), ("test", "#55a868"), ("self", "#c44e52")):
        values = np.array([r[f"complementarity_{part}"] for r in searched]) * 100
        left.bar(x, values, bottom=bottom, color=colour, label=part)
        bottom += values
    left.axhline(100 / 3, color="k", lw=0.6, ls=":")
    left.axhline(200 / 3, color="k", lw=0.6, ls=":")
    left.set(xticks=x, xticklabels=names, ylabel="% of generated samples", ylim=(0, 100),
             title="complementarity (nearest neighbour in)")
    left.legend(fontsize=8, loc="upper right")
    width = 0.38
    for k, (part, colour) in enumerate((("train", "#4c72b0"), ("test", "#55a868"))):
        right.bar(x + (k - 0.5) * width, [r[f"coverage_{part}"] * 100 for r in searched], width,
                  color=colour, label=part)
    right.axhline(50, color="k", lw=0.6, ls=":")
    right.set(xticks=x, xticklabels=names, ylabel="% of real samples", ylim=(0, 100), title="coverage")
    right.legend(fontsize=8, loc="upper right")
    _fid_panel(third, rows)
    space = rows[0]["feature_space"] if rows else ""
    fig.suptitle(f"1-NN in {space} feature space (dotted: ideal)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _fid_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """FID per row, the real test set's (reference) as a dashed line; log scale (they differ by decades)."""
    scored = [r for r in rows if r["fid"] != "" and r["generator"] != REFERENCE]
    reference = next((r for r in rows if r["generator"] == REFERENCE and r["fid"] != ""), None)
    if not scored:
        ax.set_axis_off()
        return
    x = np.arange(len(scored))
    ax.bar(x, [max(float(r["fid"]), 1e-6) for r in scored], color="#8172b2")
    if reference:
        ax.axhline(max(float(reference["fid"]), 1e-6), color="k", ls="--", lw=0.8, label="real test set")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_yscale("log")
    ax.set(xticks=x, xticklabels=[r["generator"] for r in scored], ylabel="FID (lower is better)",
           title=f"FID vs train ({scored[0]['quality_feature_space']} features)")


def quality_figure(path: Path, generator: str, block: dict[str, Any], pairs: q.Pairs, images: dict[str, np.ndarray]
                   ) -> None:
    """Closest generated/test and generated/train pairs (pixels), per-class FID, label and confidence
    histograms of one generator. `images` holds the generated sample, the test set and the train sample."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 7.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.1])
    for column, pool in enumerate(("test", "train")):
        _pairs_panel(fig.add_subplot(grid[0, column]), pool, pairs[pool], images, block)
    _per_class_panel(fig.add_subplot(grid[1, 0:2]), block)
    _labels_panel(fig.add_subplot(grid[0, 2]), fig.add_subplot(grid[1, 2]), block["labels"])
    fig.suptitle(f"{generator}: generated-data quality in {block['feature_label']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    return image if image.dtype == np.uint8 else np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _pairs_panel(ax: Any, pool: str, pair: tuple[np.ndarray, np.ndarray], images: dict[str, np.ndarray],
                 block: dict[str, Any]) -> None:
    """Top row: the generated images closest to a `pool` image; bottom row: that image."""
    distance, row = pair
    order = np.argsort(distance, kind="stable")[:PAIRS_SHOWN]
    if len(order) == 0:
        ax.set_axis_off()
        return
    top = np.concatenate([_as_uint8(images["generated"][i]) for i in order], axis=1)
    bottom = np.concatenate([_as_uint8(images[pool][row[i]]) for i in order], axis=1)
    ax.imshow(np.concatenate([top, bottom], axis=0), interpolation="nearest")
    side = images["generated"].shape[2]
    ax.set_xticks([side * (k + 0.5) for k in range(len(order))], [f"{distance[i]:.2f}" for i in order], fontsize=7)
    ax.set_yticks([])
    leak = block["leakage"]["pixels"]
    ax.set_title(f"closest generated (top) / {pool} (bottom), pixel L2; threshold {leak[pool]['threshold']:.2f}, "
                 f"flagged {100 * leak[pool]['share']:.2f}%", fontsize=8)


def _per_class_panel(ax: Any, block: dict[str, Any]) -> None:
    classes = np.arange(len(block["per_class"]["fid"]))
    series = [("generated by pseudo-label", block["per_class"]["fid"], "#8172b2"),
              ("real test set (reference)", block["per_class_reference"]["fid"], "#55a868")]
    if block.get("per_class_conditioning"):
        series.insert(1, ("generated by conditioning class", block["per_class_conditioning"]["fid"], "#c44e52"))
    width = 0.8 / len(series)
    for k, (label, values, colour) in enumerate(series):
        ax.bar(classes + (k - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values],
               width, label=label, color=colour)
    ax.set(xticks=classes, xlabel="class", ylabel="FID vs train images of the class",
           title=f"per-class FID ({block['feature_space']} features)")
    ax.legend(fontsize=8)


def _labels_panel(top: Any, bottom: Any, labels: dict[str, Any]) -> None:
    classes = np.arange(len(labels["histogram"]))
    top.bar(classes, labels["histogram"], color="#4c72b0")
    top.set(xticks=classes, xlabel="teacher pseudo-label", ylabel="images",
            title=f"pseudo-label histogram ({labels['source']}, n = {labels['n']:,})")
    top.title.set_fontsize(8)
    edges = np.asarray(labels["confidence_edges"])
    bottom.bar(edges[:-1], labels["confidence_counts"], width=np.diff(edges), align="edge", color="#dd8452")
    bottom.set(xlabel="teacher confidence (max softmax)", ylabel="images", title="teacher-confidence histogram")
    bottom.title.set_fontsize(8)


# --- CLI --------------------------------------------------------------------------------------------


def summary_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis summary",
                                     description="results/analysis/*.json -> CSV table and figure")
    parser.add_argument("--params", type=Path, help="accepted for uniformity; not read")
    parser.add_argument("--inputs", type=Path, nargs="+", required=True)
    parser.add_argument("--out-csv", type=Path, required=True)
    parser.add_argument("--out-figure", type=Path, required=True)
    args = parser.parse_args(argv)
    # Snakemake passes the JSON files, DVC the results/analysis folder: both reach the same list
    inputs = [f for p in args.inputs for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    rows = summary(inputs, args.out_csv, args.out_figure)
    log.info("wrote %s (%d rows) and %s", args.out_csv, len(rows), args.out_figure)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--generator", required=True, help=f"generator name, or {MIXUP} for the baseline")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="teacher model.pt (features and label statistics)")
    parser.add_argument("--shards", type=Path, nargs="*", default=[], help="shard folder or files")
    parser.add_argument("--labels", type=Path, nargs="*", default=[],
                        help="pseudo-label sidecar folder or files (else the teacher labels the quality sample)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--out-figure", type=Path, help="quality figure (closest pairs, per-class FID, histograms)")
    args = parser.parse_args(argv)
    if (args.generator == MIXUP) == bool(args.shards):
        parser.error(f"--shards is required for a generator and not allowed for {MIXUP}")
    if args.generator == MIXUP and args.labels:
        parser.error(f"--labels is not allowed for {MIXUP} (its labels are the teacher's)")
    return args


def quality_input(cfg: AnalysisConfig, seed: int, args: argparse.Namespace, teacher: models.Classifier | None,
                  generated: tuple[np.ndarray, np.ndarray], num_classes: int, device: torch.device) -> QualityInput:
    """The quality sample (its own seeded draw; for mixup, the blends) and its pseudo-labels."""
    if args.generator == MIXUP:
        images, conditioning = generated
        ids = np.arange(len(images))
    else:
        files = shard_files(args.shards, args.generator)
        rng = seeding.numpy_rng(seed, "analysis", "quality", "generated", args.generator)
        ids, images, conditioning = generated_rows(files, cfg.quality_n, rng)
    if args.labels:
        labels, summary_ = sidecar_labels(shard_files(args.shards, args.generator), args.labels, ids, num_classes)
    elif teacher is not None:
        labels, summary_ = teacher_labels(teacher, images, cfg.batch_size, device)
    else:
        raise ValueError("pseudo-labels of the quality sample need --labels or --teacher")
    return QualityInput(images, ids, conditioning, labels, summary_)


def main(argv: list[str] | None = None) -> None:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv[:1] == ["summary"]:
        summary_main(argv[1:])
        return
    args = parse_args(argv)
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(AnalysisConfig, cfg_all["analysis"])
    seed = cfg_all["base"]["seed"]
    device = models.resolve_device(cfg_all["base"]["device"])
    if args.teacher is None and (cfg.feature_space == "teacher" or not cfg.inception_weights):
        raise SystemExit("error: --teacher is required (analysis.feature_space teacher, or quality metrics "
                         "without analysis.inception_weights)")
    try:
        teacher = models.load_checkpoint(args.teacher, device) if args.teacher else None
        space, embed = embedder(cfg, teacher, device)   # a missing weights file fails before any work
        train, test = read_imageset(args.train), read_imageset(args.test)
        if args.generator == MIXUP:
            # Blends of the train pool that analyse() searches (same indices), one per pool image,
            # so the three sets weigh the same.
            pool = train_pool_indices(len(train[0]), cfg.n_samples, seed)
            generated = mixup_sample(*train, pool, cfg.mixup_alpha, seed)[:2]
        else:
            generated = generated_sample(args.shards, cfg.n_samples, seed, args.generator)
        result = analyse(cfg, seed, args.generator, train, test, generated, teacher, device)
        num_classes = teacher.head.out_features if teacher is not None else int(train[1].max()) + 1
        gen = quality_input(cfg, seed, args, teacher, generated, num_classes, device)
        result["quality"], pairs, train_idx = quality(cfg, seed, space, embed, train, test, gen, num_classes, device)
    except (ShardError, feat.FeatureError, q.WeightsError) as error:
        raise SystemExit(f"error: {error}") from None
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    if args.out_figure:
        quality_figure(args.out_figure, args.generator, result["quality"], pairs,
                       {"generated": gen.images, "test": test[0], "train": train[0][train_idx]})
    block = result["quality"]
    log.info("%s: complementarity %s, coverage %s; FID %s (%s features; real test set %s)", args.out,
             {k: round(v, 3) for k, v in result["complementarity"].items()},
             {k: round(v, 3) for k, v in result["coverage"].items()}, _sig(block["generated"]["fid"]),
             space, _sig(block["reference_test"]["fid"]))


if __name__ == "__main__":
    main()
