"""Stage `data`: the official CIFAR-10 python archive -> HDF5 image sets train / val / test.

    python -m pipeline.data --params params.yaml --out-dir data/cifar10

The archive is a URL (downloaded to data/raw/ atomically) or a local path; its md5 must equal
`data.md5` (the official value by default; state your own for a local copy). The batches are read
straight from the tar file. `val_size` training images, drawn with the base seed, are held out as
val.h5 for checkpoint selection; train.h5 holds the rest, so generators never see them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import params as params_mod
from pipeline.shards import atomic_path, write_imageset

log = logging.getLogger("pipeline.data")
TRAIN_MEMBERS = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
TEST_MEMBER = "cifar-10-batches-py/test_batch"


@dataclass(frozen=True)
class DataConfig:
    """Mirror of params.yaml `data:`."""
    archive: str       # URL or local path of cifar-10-python.tar.gz
    md5: str           # expected md5 of the archive
    val_size: int      # training images held out for validation
    n_train: int       # first n training images (0 = all)
    n_test: int        # first n test images (0 = all)


class ArchiveError(RuntimeError):
    """The archive is missing, has the wrong checksum, or is not the CIFAR-10 python layout."""


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
            raise ArchiveError(f"{path}: CIFAR-10 archive not found")
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


def read_batches(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from the archive, uint8 NHWC."""
    def load(tar: tarfile.TarFile, member: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            handle = tar.extractfile(member)
        except KeyError:
            raise ArchiveError(f"{path}: no {member} in archive (not the CIFAR-10 python layout)") from None
        batch = pickle.load(handle, encoding="latin1")
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), np.asarray(batch["labels"], dtype=np.int64)

    try:
        with tarfile.open(path, "r:*") as tar:
            train = [load(tar, member) for member in TRAIN_MEMBERS]
            test = load(tar, TEST_MEMBER)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveError(f"{path}: unreadable archive ({error})") from None
    return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), *test)


def split(cfg: DataConfig, seed: int, train_x: np.ndarray, train_y: np.ndarray,
          test_x: np.ndarray, test_y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Apply n_train / n_test and hold out a seeded validation split."""
    if cfg.n_train:
        train_x, train_y = train_x[: cfg.n_train], train_y[: cfg.n_train]
    if cfg.n_test:
        test_x, test_y = test_x[: cfg.n_test], test_y[: cfg.n_test]
    if cfg.val_size >= len(train_x):
        raise ValueError(f"data.val_size {cfg.val_size} leaves no training images of {len(train_x)}")
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(order[: cfg.val_size]), np.sort(order[cfg.val_size:])
    return {"train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out-dir", type=Path, required=True, help="writes train.h5, val.h5, test.h5")
    parser.add_argument("--raw-dir", type=Path, default=Path("data/raw"), help="download cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg_all = params_mod.load(args.params)
    cfg = params_mod.section(DataConfig, cfg_all["data"])
    archive = fetch(cfg.archive, args.raw_dir)
    verify_md5(archive, cfg.md5)
    sets = split(cfg, cfg_all["base"]["seed"], *read_batches(archive))
    for name, (images, labels) in sets.items():
        checksum = write_imageset(args.out_dir / f"{name}.h5", images, labels,
                                  {"source": str(cfg.archive), "archive_md5": cfg.md5, "split": name})
        log.info("%s: %d images, sha256 %s", name, len(images), checksum[:12])


if __name__ == "__main__":
    main()
