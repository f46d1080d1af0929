"""The data sets of the paper (CIFAR-10, CIFAR-100, SVHN): official sources and readers.

Each reader turns the official files, untouched, into (train images, train labels, test images, test
labels) as uint8 NHWC and int64; everything downstream is the same HDF5 image set whatever the data set.
`base.dataset` picks the entry; `data.archive` and `data.md5` say where the files are and what they must
hash to (the official values are below and in the configs/datasets/ overlays).

- cifar10, cifar100: one python tar archive (`data.md5` a string).
- svhn: two MATLAB files, train_32x32.mat and test_32x32.mat, in a folder or under a URL prefix
  (`data.md5` maps each file name to its md5). SVHN's label 10 means digit 0 and becomes 0 here,
  as in torchvision. The 531k `extra` images are not used (the paper trains on the 73k train split).
"""

from __future__ import annotations

import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class ArchiveError(RuntimeError):
    """An input file is missing, has the wrong checksum, or is not in the official layout."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    files: tuple[str, ...]       # file names (for an archive: its own name)
    url: str                     # official location (archive URL, or prefix of `files`)
    md5: str | dict[str, str]    # official md5 of the archive, or per file
    read: Callable[[list[Path]], Arrays]


def _cifar_reader(folder: str, train_members: list[str], test_member: str, label_key: str
                  ) -> Callable[[list[Path]], Arrays]:
    def read(paths: list[Path]) -> Arrays:
        (path,) = paths

        def load(tar: tarfile.TarFile, member: str) -> tuple[np.ndarray, np.ndarray]:
            try:
                handle = tar.extractfile(f"{folder}/{member}")
            except KeyError:
                handle = None
            if handle is None:  # absent (KeyError), or present but not a regular file (extractfile gives None)
                raise ArchiveError(f"{path}: no {folder}/{member} in archive (not the official python "
                                   "layout of this data set)")
            batch = pickle.load(handle, encoding="latin1")
            images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return np.ascontiguousarray(images), np.asarray(batch[label_key], dtype=np.int64)

        try:
            with tarfile.open(path, "r:*") as tar:
                train = [load(tar, member) for member in train_members]
                test = load(tar, test_member)
        except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise ArchiveError(f"{path}: unreadable archive ({error})") from None
        return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), *test)
    return read


def read_svhn(paths: list[Path]) -> Arrays:
    """train_32x32.mat and test_32x32.mat: X is 32 x 32 x 3 x N uint8, y is N x 1 in 1..10."""
    from scipy.io import loadmat  # only SVHN needs scipy

    out: list[np.ndarray] = []
    for path in paths:
        try:
            mat = loadmat(path)
        except (ValueError, OSError, TypeError) as error:
            raise ArchiveError(f"{path}: unreadable MATLAB file ({error})") from None
        if "X" not in mat or "y" not in mat or mat["X"].shape[:3] != (32, 32, 3):
            raise ArchiveError(f"{path}: no 32x32x3xN `X` and `y` (not the official SVHN cropped-digit file)")
        images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2).astype(np.uint8))
        labels = mat["y"].reshape(-1).astype(np.int64) % 10   # label 10 is the digit 0
        if len(labels) != len(images):
            raise ArchiveError(f"{path}: {len(images)} images but {len(labels)} labels")
        out += [images, labels]
    return out[0], out[1], out[2], out[3]


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10", 10, ("cifar-10-python.tar.gz",), "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        _cifar_reader("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels")),
    "cifar100": DatasetSpec(
        "cifar100", 100, ("cifar-100-python.tar.gz",),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        _cifar_reader("cifar-100-python", ["train"], "test", "fine_labels")),
    "svhn": DatasetSpec(
        "svhn", 10, ("train_32x32.mat", "test_32x32.mat"), "http://ufldl.stanford.edu/housenumbers/",
        {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
        read_svhn),
}


def get(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"base.dataset: unknown {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def num_classes(name: str) -> int:
    return get(name).num_classes


def sources(spec: DatasetSpec, archive: str) -> list[str]:
    """The files to fetch: the archive itself, or each of `spec.files` inside the folder / URL prefix."""
    if len(spec.files) == 1:
        return [archive]
    sep = "" if archive.endswith("/") else "/"
    return [f"{archive}{sep}{name}" for name in spec.files]


def check_md5_shape(spec: DatasetSpec, md5: str | dict[str, str]) -> None:
    """An archive data set takes one md5 string; a multi-file one a {file name: md5} mapping of all its files."""
    if len(spec.files) == 1 and not isinstance(md5, str):
        raise ValueError(f"data.md5: {spec.name} is one archive; give its md5 as a string")
    if len(spec.files) > 1 and (not isinstance(md5, dict) or set(md5) != set(spec.files)):
        raise ValueError(f"data.md5: {spec.name} has {len(spec.files)} files; give a mapping with exactly "
                         f"{', '.join(spec.files)} (official: {spec.md5})")


def expected_md5(md5: str | dict[str, str], source: str) -> str:
    """The md5 a fetched file must have (after check_md5_shape): `data.md5` itself, or its file's entry."""
    return md5 if isinstance(md5, str) else md5[Path(source).name]
