"""Stage `data`: the official archive of `base.dataset` -> HDF5 image sets train / val / test.

    python -m pipeline.data --params params.yaml --out-dir data/cifar10

The archive (CIFAR-10/100: the python tar; SVHN: the folder or URL prefix of its two .mat files, see
pipeline/datasets.py) is a URL (downloaded to data/raw/ atomically) or a local path; each file's md5
must equal `data.md5` (the official value by default; state your own for a local copy). The batches
are read straight from the tar file. `val_size` training images, drawn with the base seed, are held out as
val.h5 for checkpoint selection; train.h5 holds the rest, so generators never see them.

With `data.n_labelled` > 0 only a class-balanced subset of that many training images keeps its labels
(train.h5 + val.h5, the validation split taken from it); the other training images go to unlabelled.h5
in a seeded random order with every label -1, the stand-in for extra unlabelled (or ideally generated)
data that the `oracle` generator serves to the teacher, as Carmon et al. (2019) use 80M-TinyImages. No
file holds their true labels, so no later stage can read them. With n_labelled 0 every training image is
labelled and unlabelled.h5 is empty (the DAG declares it either way).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import datasets, seeding
from pipeline import params as params_mod
from pipeline.config import DataConfig
from pipeline.datasets import ArchiveError
from pipeline.labels import UNLABELLED
from pipeline.shards import atomic_path, write_imageset

log = logging.getLogger("pipeline.data")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(archive: str, raw_dir: Path) -> Path:
    """Return a local path to the archive, downloading a URL once (atomic, so no partial file)."""
    if "://" not in archive:
        path = Path(archive)
        if not path.exists():
            raise ArchiveError(f"{path}: data archive not found (data.archive)")
        return path
    target = raw_dir / Path(archive).name
    if not target.exists():
        log.info("downloading %s", archive)
        with atomic_path(target) as tmp, urllib.request.urlopen(archive, timeout=60) as response:
            with open(tmp, "wb") as handle:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
    return target


def verify_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise ArchiveError(
            f"{path}: md5 {actual} does not match data.md5 {expected} (corrupt or different file; "
            "if this is a trusted local copy, set data.md5 to its md5)"
        )


def read_batches(path: Path, dataset: str = "cifar10") -> datasets.Arrays:
    """(train images, train labels, test images, test labels) of a local archive, uint8 NHWC."""
    return datasets.get(dataset).read([Path(path)])


def fetch_all(spec: datasets.DatasetSpec, cfg: DataConfig, raw_dir: Path) -> list[Path]:
    """Fetch and md5-check every file of the data set, before anything is decoded."""
    datasets.check_md5_shape(spec, cfg.md5)
    paths = []
    for source in datasets.sources(spec, cfg.archive):
        path = fetch(source, raw_dir)
        verify_md5(path, datasets.expected_md5(cfg.md5, source))
        paths.append(path)
    return paths


class Subset(NamedTuple):
    labelled: np.ndarray   # indices that keep their labels, sorted
    pool: np.ndarray       # the other indices, in a seeded random order (unlabelled.h5)
    examined: np.ndarray   # indices whose labels were looked at; no other label decides anything


def labelled_subset(labels: np.ndarray, n_labelled: int, num_classes: int, seed: int) -> Subset:
    """n_labelled / num_classes images of each class, the rest as the pool.

    Walks a seeded permutation and keeps each class's first images until every class is full, so the labels
    of the images after that point are never looked at; the pool's order depends only on which images it
    holds.
    """
    per_class = n_labelled // num_classes
    order = seeding.numpy_rng(seed, "data", "labelled").permutation(len(labels))
    taken = np.zeros(num_classes, dtype=np.int64)
    chosen, examined = [], 0
    for index in order:
        if taken.min() == per_class:
            break
        examined += 1
        label = int(labels[index])
        if taken[label] < per_class:
            taken[label] += 1
            chosen.append(index)
    if taken.min() < per_class:
        short = int(np.argmin(taken))
        raise ValueError(f"data.n_labelled {n_labelled} needs {per_class} images of each class, but class {short} "
                         f"has only {taken[short]} among the {len(labels)} training images")
    labelled = np.sort(np.asarray(chosen, dtype=np.int64))
    rest = np.setdiff1d(np.arange(len(labels)), labelled)
    return Subset(labelled, seeding.numpy_rng(seed, "data", "unlabelled").permutation(rest), order[:examined])


def split(cfg: DataConfig, seed: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
          test_y: np.ndarray, *, num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Apply n_train / n_test, keep the labels of n_labelled images and hold out a seeded validation split."""
    if cfg.n_train:
        train_x, train_y = train_x[: cfg.n_train], train_y[: cfg.n_train]
    if cfg.n_test:
        test_x, test_y = test_x[: cfg.n_test], test_y[: cfg.n_test]
    pool_x = np.zeros((0, *train_x.shape[1:]), dtype=train_x.dtype)
    if cfg.n_labelled:
        if cfg.n_labelled > len(train_x):
            raise ValueError(f"data.n_labelled {cfg.n_labelled} is more than the {len(train_x)} training images")
        labelled, pool, _ = labelled_subset(train_y, cfg.n_labelled, num_classes, seed)
        pool_x = train_x[pool]
        train_x, train_y = train_x[labelled], train_y[labelled]
    if cfg.val_size >= len(train_x):
        raise ValueError(f"data.val_size {cfg.val_size} leaves no training images of {len(train_x)}")
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(order[: cfg.val_size]), np.sort(order[cfg.val_size:])
    return {"train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y),
            "unlabelled": (pool_x, np.full(len(pool_x), UNLABELLED, dtype=np.int64))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out-dir", type=Path, required=True, help="writes train.h5, val.h5, test.h5, unlabelled.h5")
    parser.add_argument("--raw-dir", type=Path, default=Path("data/raw"), help="download cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(DataConfig, cfg_all["data"])
    spec = datasets.get(cfg_all["base"]["dataset"])
    try:
        paths = fetch_all(spec, cfg, args.raw_dir)
        sets = split(cfg, cfg_all["base"]["seed"], *spec.read(paths), num_classes=spec.num_classes)
    except (ArchiveError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    md5_text = cfg.md5 if isinstance(cfg.md5, str) else json.dumps(cfg.md5, sort_keys=True)
    for name, (images, labels) in sets.items():
        checksum = write_imageset(args.out_dir / f"{name}.h5", images, labels,
                                  {"source": str(cfg.archive), "archive_md5": md5_text, "split": name,
                                   "dataset": spec.name, "num_classes": spec.num_classes})
        log.info("%s: %d images, sha256 %s", name, len(images), checksum[:12])


if __name__ == "__main__":
    main()
