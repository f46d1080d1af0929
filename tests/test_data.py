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


# --- data.n_labelled: a class-balanced labelled subset, the rest an unlabelled pool ---


def _split(tiny_params, **data_keys):
    cfg = data.DataConfig(**{**tiny_params["data"], **data_keys})
    return data.split(cfg, tiny_params["base"]["seed"], *data.read_batches(DEMO_ARCHIVE), num_classes=10)


@pytest.mark.parametrize("n_train, expected", [
    (600, {"train": "b5059b0ad4126c2a", "val": "854e4b2202d12d25", "test": "8a2040ef5973b5a3"}),
    (0, {"train": "03f2f3fa2e0d3095", "val": "135b20a03829122a", "test": "8a2040ef5973b5a3"})])
def test_n_labelled_0_keeps_every_label_and_the_sets_of_before(tiny_params, n_train, expected):
    """The content hashes the data stage wrote before n_labelled existed; the pool is empty."""
    sets = _split(tiny_params, n_train=n_train, n_labelled=0)
    assert {name: shards.content_hash(*sets[name])[:16] for name in expected} == expected
    assert sets["unlabelled"][0].shape == (0, 32, 32, 3) and sets["unlabelled"][1].shape == (0,)


def test_n_labelled_is_class_balanced_with_val_inside_and_the_rest_unlabelled(tiny_params):
    sets = _split(tiny_params, n_labelled=100)
    (train_x, train_y), (val_x, val_y), (pool_x, pool_y) = sets["train"], sets["val"], sets["unlabelled"]
    assert len(train_x) + len(val_x) == 100 and len(val_x) == tiny_params["data"]["val_size"]
    assert np.bincount(np.concatenate([train_y, val_y]), minlength=10).tolist() == [10] * 10
    assert (pool_y == -1).all() and len(pool_x) == 600 - 100
    # every one of the first 600 training images is in exactly one set
    source = data.read_batches(DEMO_ARCHIVE)[0][:600]
    rows = sorted(row.tobytes() for row in np.concatenate([train_x, val_x, pool_x]))
    assert rows == sorted(row.tobytes() for row in source)
    # the pool is in a seeded random order (not the archive's), the same on every run
    positions = {row.tobytes(): i for i, row in enumerate(source)}
    pool_positions = [positions[row.tobytes()] for row in pool_x]
    assert pool_positions != sorted(pool_positions)
    assert np.array_equal(_split(tiny_params, n_labelled=100)["unlabelled"][0], pool_x)


def test_labelled_subset_reads_no_label_past_the_full_classes():
    labels = np.random.default_rng(1).integers(0, 10, 5000)
    subset = data.labelled_subset(labels, 200, 10, seed=3)
    assert len(subset.examined) < len(labels) and set(subset.labelled) <= set(subset.examined)
    relabelled = labels.copy()
    unseen = np.setdiff1d(np.arange(len(labels)), subset.examined)
    relabelled[unseen] = (relabelled[unseen] + 1) % 10
    again = data.labelled_subset(relabelled, 200, 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(subset, again))


def test_n_labelled_more_than_a_class_holds_fails_naming_the_class():
    labels = np.array([0] * 50 + [1] * 3)
    with pytest.raises(ValueError, match=r"data.n_labelled 10 needs 5 images of each class, but class 1 has only 3"):
        data.labelled_subset(labels, 10, 2, seed=0)


@pytest.mark.parametrize("keys, message", [
    ({"n_labelled": 105}, r"data.n_labelled: 105 is not a multiple of the 10 classes"),
    ({"n_labelled": 50}, r"data.val_size: 50 must be smaller than data.n_labelled 50"),
    ({"n_labelled": 700}, r"data.n_labelled: 700 is more than data.n_train 600")])
def test_bad_n_labelled_is_refused_at_validation(tiny_params, keys, message):
    from pipeline import params as params_mod

    tiny_params["data"].update(keys)
    with pytest.raises(params_mod.ParamsError, match=message):
        params_mod.validate(tiny_params)


def test_cli_writes_an_empty_unlabelled_set_by_default(tiny_params, write_params, tmp_path):
    out = tmp_path / "cifar10"
    data.main(["--params", str(write_params(tiny_params)), "--out-dir", str(out)])
    images, labels = shards.read_imageset(out / "unlabelled.h5")
    assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)
    assert shards.read_attrs(out / "unlabelled.h5")["split"] == "unlabelled"
