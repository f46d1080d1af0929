"""The data stage on the shipped real CIFAR-10 subset: md5 check, official layout, split sizes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline import data, shards
from tests.helpers import DEMO_ARCHIVE


def test_demo_archive_is_real_cifar10_layout():
    train_x, train_y, test_x, test_y = data.read_batches(DEMO_ARCHIVE)
    assert train_x.shape == (2000, 32, 32, 3) and test_x.shape == (500, 32, 32, 3)
    assert train_x.dtype == np.uint8
    # the official first labels of data_batch_1 and test_batch
    assert list(train_y[:10]) == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert list(test_y[:10]) == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert set(np.unique(train_y)) == set(range(10))


def test_cli_writes_disjoint_splits(tiny_params, write_params, tmp_path):
    out = tmp_path / "cifar10"
    subprocess.run([sys.executable, "-m", "pipeline.data", "--params", str(write_params(tiny_params)),
                    "--out-dir", str(out)], check=True)
    train, val, test = (shards.read_imageset(out / f"{s}.h5") for s in ("train", "val", "test"))
    cfg = tiny_params["data"]
    assert len(train[0]) == cfg["n_train"] - cfg["val_size"] and len(val[0]) == cfg["val_size"]
    assert len(test[0]) == cfg["n_test"]
    train_rows = {row.tobytes() for row in train[0]}
    assert not any(row.tobytes() in train_rows for row in val[0])


def test_wrong_md5_fails_naming_the_archive(tiny_params, write_params, tmp_path):
    tiny_params["data"]["md5"] = "0" * 32
    result = subprocess.run([sys.executable, "-m", "pipeline.data", "--params",
                             str(write_params(tiny_params)), "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "cifar-10-demo-python.tar.gz" in result.stderr and "md5" in result.stderr
    assert not (tmp_path / "out").exists()


def test_url_download_is_verified(tmp_path):
    """The real download path, against a local file:// URL (no network in tests)."""
    copy = tmp_path / "cifar-10-python.tar.gz"
    shutil.copy(DEMO_ARCHIVE, copy)
    fetched = data.fetch(copy.as_uri(), tmp_path / "raw")
    assert fetched.read_bytes() == DEMO_ARCHIVE.read_bytes()
    with pytest.raises(data.ArchiveError, match="md5"):
        data.verify_md5(fetched, "f" * 32)
