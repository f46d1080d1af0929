"""Stage `select` (optional): choose generated images by their pseudo-labels; writes an index only.

    python -m pipeline.select --params params.yaml --labels-dir data/pseudolabels/{g} \
        --out data/selection/{g}/index.npy

Per class of the sidecar's `label` (the teacher's, or the generator's with pseudolabel.label_source
generator), images are ranked by confidence (the teacher's probability of that label: its max softmax
for teacher labels, DM-Improves-AT's selection score for generator labels; ties by position) and the top
`top_fraction` kept (as later work does with conditional generators); with `class_balance`, every class
is then cut to the size of the smallest one, keeping the most confident (the paper's released data was
filtered only to balance classes). The output is an int64 array of shape K x 2 holding
(shard number, row) pairs sorted by shard then row, where shard number is the `{i}` of
`shard-{i:05d}.h5`. Images are never copied; readers pair the index with the shard and sidecar files
(pipeline.labels.load_labels checks that they belong together).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from pipeline import datasets
from pipeline import params as params_mod
from pipeline.config import SelectConfig
from pipeline.shards import ShardError, atomic_path, expand, read_arrays, read_attrs

log = logging.getLogger("pipeline.select")
SHARD_NUMBER = re.compile(r"shard-(\d+)\.h5$")


class SelectionError(ValueError):
    """A selection that would keep no image."""


def select(cfg: SelectConfig, labels: np.ndarray, confidence: np.ndarray,
           num_classes: int | None = None) -> np.ndarray:
    """Positions (into the concatenated arrays) of the kept images, sorted ascending."""
    labels, confidence = np.asarray(labels), np.asarray(confidence)
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    kept: list[np.ndarray] = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        # Most confident first; a stable sort keeps earlier positions first among equal confidences.
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        kept.append(ranked[: math.ceil(cfg.top_fraction * len(ranked))])
    if cfg.class_balance and kept:
        smallest = min(len(k) for k in kept)
        kept = [k[:smallest] for k in kept]
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def shard_number(path: Path) -> int:
    match = SHARD_NUMBER.search(Path(path).name)
    if not match:
        raise ShardError(f"{path}: not named shard-<number>.h5")
    return int(match.group(1))


def select_dir(cfg: SelectConfig, labels_dir: Path, num_classes: int = 10) -> tuple[np.ndarray, dict]:
    """(K x 2 index of (shard number, row), per-class counts before and after) for a sidecar folder."""
    sidecars = expand([labels_dir])
    if not sidecars:
        raise ShardError(f"{labels_dir}: no shard-*.h5 pseudo-label sidecars")
    numbers, rows, labels, confidence = [], [], [], []
    teachers = set()
    for path in sidecars:
        arrays = read_arrays(path, verify=True)
        teachers.add(read_attrs(path).get("teacher_sha256"))
        n = len(arrays["label"])
        numbers.append(np.full(n, shard_number(path), dtype=np.int64))
        rows.append(np.arange(n, dtype=np.int64))
        labels.append(arrays["label"])
        confidence.append(arrays["confidence"])
    if len(teachers) > 1:
        raise ShardError(f"{labels_dir}: sidecars were made by {len(teachers)} different teachers")
    labels_all, conf_all = np.concatenate(labels), np.concatenate(confidence)
    keep = select(cfg, labels_all, conf_all, num_classes)
    if len(keep) == 0:  # training on it would fail later, and less clearly
        counts = np.bincount(labels_all, minlength=num_classes).tolist()
        cause = ("select.class_balance cuts every class to the smallest, and some class has none"
                 if cfg.class_balance and min(counts) == 0 else "select.top_fraction keeps none")
        raise SelectionError(f"{labels_dir}: the selection keeps none of {len(labels_all)} images ({cause}; "
                             f"images per label: {counts}). Check the generator's samples, or set "
                             "select.class_balance: false")
    index = np.stack([np.concatenate(numbers)[keep], np.concatenate(rows)[keep]], axis=1)
    stats = {"n_total": int(len(labels_all)), "n_selected": int(len(keep)),
             "per_class_before": np.bincount(labels_all, minlength=num_classes).tolist(),
             "per_class_after": np.bincount(labels_all[keep], minlength=num_classes).tolist(),
             "teacher_sha256": teachers.pop()}
    return index, stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--labels-dir", type=Path, required=True, help="pseudo-label sidecars of one generator")
    parser.add_argument("--out", type=Path, required=True, help="index.npy (K x 2 int64: shard, row)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(SelectConfig, cfg_all["select"])
    try:
        index, stats = select_dir(cfg, args.labels_dir, datasets.num_classes(cfg_all["base"]["dataset"]))
    except (ShardError, SelectionError) as error:
        raise SystemExit(f"error: {error}") from None
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, index)
    log.info("%s: kept %d of %d images; per class %s", args.out, stats["n_selected"], stats["n_total"],
             json.dumps(stats["per_class_after"]))


if __name__ == "__main__":
    main()
