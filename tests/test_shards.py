"""The HDF5 image-set format: round trip, checksums that catch corruption, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import shards


def sample(n: int = 70, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_round_trip_keeps_bytes_and_provenance(tmp_path):
    images, labels = sample()
    path = tmp_path / "shard-00000.h5"
    checksum = shards.write_imageset(path, images, labels, {"generator": "gaussian", "seed": 3})
    read_images, read_labels = shards.read_imageset(path)
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)
    attrs = shards.read_attrs(path)
    assert attrs["sha256"] == checksum and attrs["generator"] == "gaussian" and attrs["seed"] == 3
    assert shards.count(path) == 70


def test_truncated_set_is_named(tmp_path):
    path = tmp_path / "shard-00001.h5"
    shards.write_imageset(path, *sample())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(shards.ShardError, match="shard-00001.h5"):
        shards.read_imageset(path)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    path = tmp_path / "shard-00002.h5"
    images, labels = sample()
    shards.write_imageset(path, images, labels)
    with __import__("h5py").File(path, "r+") as h5:  # corrupt one pixel in place, keep the attrs
        h5["images"][5, 5, 5, 0] ^= 0xFF
    with pytest.raises(shards.ShardError, match="shard-00002.h5.*checksum"):
        shards.read_imageset(path)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "shard-00003.h5"

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "fsync", explode)
    with pytest.raises(OSError, match="disk full"):
        shards.write_imageset(path, *sample())
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_whole_file(tmp_path):
    path = tmp_path / "shard-00004.h5"
    shards.write_imageset(path, *sample(seed=1))
    images, labels = sample(n=10, seed=2)
    shards.write_imageset(path, images, labels)
    assert np.array_equal(shards.read_imageset(path)[0], images)


def test_expand_accepts_files_and_directories(tmp_path):
    for i in (1, 0):
        shards.write_imageset(tmp_path / f"shard-{i:05d}.h5", *sample(n=4))
    listed = shards.expand([tmp_path])
    assert [p.name for p in listed] == ["shard-00000.h5", "shard-00001.h5"]
    assert shards.expand(listed) == listed


def test_finished_files_are_readable_by_the_group(tmp_path):
    path = tmp_path / "shard-00005.h5"
    shards.write_imageset(path, *sample(n=4))
    assert path.stat().st_mode & 0o044  # not mkstemp's 0600: shared caches and colleagues can read it
