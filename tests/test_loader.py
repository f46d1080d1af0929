"""Mixed real/generated loader: composition, shuffle across shards, determinism, rank split, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from pipeline import loader
from pipeline.shards import ShardError, read_attrs, read_imageset, write_arrays, write_imageset
from tests.helpers import make_generated


@pytest.fixture
def generated(tmp_path):
    return make_generated(tmp_path, n_shards=4, per_shard=50)


def dataset(cifar_sets, generated, batch=32, fraction=0.25, augmentation=True, rank=0, world=1):
    real = loader.pool([cifar_sets["train"]])
    gen = loader.pool([generated[0]], [generated[1]])
    n_gen = loader.split_batch(batch, fraction)[1]
    return loader.MixedBatches(real, gen, loader.BatchSpec(batch, n_gen, 7, rank, world), augmentation)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 256, 1000, 4099])
def test_permute_is_a_bijection(n):
    out = loader.permute(np.arange(n), n, key=5)
    assert sorted(out.tolist()) == list(range(n))
    if n > 16:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, loader.permute(np.arange(n), n, key=6))


def test_stream_covers_each_member_once_per_pass():
    s = loader.stream_indices(0, 300, 100, "x")
    for p in range(3):
        assert sorted(s[p * 100:(p + 1) * 100].tolist()) == list(range(100))
    assert not np.array_equal(s[:100], s[100:200])           # a new permutation every pass
    assert np.array_equal(loader.stream_indices(150, 40, 100, "x"), s[150:190])


def test_batch_composition_and_labels(cifar_sets, generated):
    ds = dataset(cifar_sets, generated, batch=40, fraction=0.3, augmentation=False)
    train_images, train_labels = read_imageset(cifar_sets["train"])
    for step in range(5):
        images, labels, is_gen = ds[step]
        assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
        assert int(is_gen.sum()) == 12                       # round(40 * 0.3) generated in every batch
        assert not is_gen[:28].any()                          # real first
        real, gen, _ = ds.members(step)
        # Real images and labels are the training set's rows.
        assert np.array_equal(images[:28].permute(0, 2, 3, 1).numpy(), train_images[real])
        assert np.array_equal(labels[:28].numpy(), train_labels[real])
        # Generated labels come from the sidecars (pseudo-labels), not the shards' -1.
        assert (labels[28:] >= 0).all()
        assert np.array_equal(labels[28:].numpy(), ds.generated.labels[gen])
        # The pixel code names the shard and row each generated image was read from.
        file_index, rows = ds.generated.locate(gen)
        assert np.array_equal(images[28:, 0, 0, 0].numpy(), file_index)
        assert np.array_equal(images[28:, 0, 0, 1].numpy(), rows % 256)


def test_shuffle_mixes_across_shards(cifar_sets, generated):
    ds = dataset(cifar_sets, generated, batch=64, fraction=0.25, augmentation=False)
    shards_per_batch = [len(np.unique(ds.generated.locate(ds.members(s)[1])[0])) for s in range(4)]
    assert min(shards_per_batch) >= 3                   # 16 images from 4 shards of 50, not one shard at a time
    seen = np.concatenate([ds.members(s)[1] for s in range(200 // 16)])
    assert len(np.unique(seen)) == len(seen)            # no repeats within a pass over 200 images


def test_batches_do_not_depend_on_workers_or_start(cifar_sets, generated):
    ds = dataset(cifar_sets, generated)
    serial = list(loader.loader(ds, 0, 6, num_workers=0))
    parallel = list(loader.loader(ds, 2, 6, num_workers=2, prefetch_factor=2))
    for a, b in zip(serial[2:], parallel):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(serial[0][0], serial[1][0])


def test_ranks_split_the_global_batch(cifar_sets, generated):
    whole = dataset(cifar_sets, generated, batch=32)[3]
    shares = [dataset(cifar_sets, generated, batch=32, rank=r, world=2)[3] for r in range(2)]
    # Rank r holds real share r then generated share r, each image augmented as in the 1-process batch.
    real = [s[0][~s[2]] for s in shares]
    gen = [s[0][s[2]] for s in shares]
    assert torch.equal(torch.cat(real), whole[0][~whole[2]])
    assert torch.equal(torch.cat(gen), whole[0][whole[2]])


def test_selection_restricts_members(cifar_sets, generated):
    index = np.array([[1, 3], [1, 7], [3, 0]])
    pool = loader.pool([generated[0]], [generated[1]], index)
    assert len(pool) == 3
    f, rows = pool.locate(np.arange(3))
    assert f.tolist() == [1, 1, 3] and rows.tolist() == [3, 7, 0]
    with pytest.raises(ShardError, match="not among"):
        loader.pool([generated[0]], [generated[1]], np.array([[9, 0]]))


def test_mismatched_sidecar_is_refused(tmp_path, generated):
    shard = generated[0] / "shard-00000.h5"
    other = tmp_path / "bad" / "shard-00000.h5"
    write_arrays(other, {"label": np.zeros(49, dtype=np.int64)},
                 {"shard": shard.name, "shard_sha256": read_attrs(shard)["sha256"]})
    with pytest.raises(ShardError, match="49 labels"):
        loader.pool([shard], [other])
    with pytest.raises(ShardError, match="unlabelled"):
        loader.pool([shard])                             # no sidecar: shard labels are -1


def _peak_bytes_reading(ds: loader.MixedBatches, steps: int) -> int:
    tracemalloc.start()
    for step in range(steps):
        ds[step]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_generated_images(tmp_path, cifar_sets):
    """Reading batches from 1,000 vs 20,000 generated images: same peak allocation (no pool-sized arrays)."""
    sizes = {}
    for n_shards in (1, 20):
        gen, labels = make_generated(tmp_path / str(n_shards), n_shards, per_shard=1000)
        real = loader.pool([cifar_sets["train"]])
        pool = loader.pool([gen], [labels])
        ds = loader.MixedBatches(real, pool, loader.BatchSpec(128, 64, 1), augmentation=True)
        ds[0]  # open files first: descriptor count is bounded by MAX_OPEN_FILES, not by images
        sizes[n_shards] = _peak_bytes_reading(ds, 8)
        assert pool.labels.nbytes == 2 * len(pool)   # the only per-image state: a 2-byte label
    assert sizes[20] < 1.1 * sizes[1], sizes


def test_raw_reads_match_hdf5_and_compressed_sets_fall_back(tmp_path):
    import h5py
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (150, 32, 32, 3), dtype=np.uint8)
    write_imageset(tmp_path / "plain" / "shard-00000.h5", images, np.zeros(150, dtype=np.int64))
    with h5py.File(tmp_path / "packed.h5", "w") as h5:           # gzip: rows are not at fixed offsets
        h5.create_dataset("images", data=images, chunks=(10, 32, 32, 3), compression="gzip")
        h5.create_dataset("labels", data=np.zeros(150, dtype=np.int64))
    rows = np.array([149, 0, 64, 63, 64, 7])
    for path in (tmp_path / "plain" / "shard-00000.h5", tmp_path / "packed.h5"):
        ds = loader.MixedBatches(loader.pool([path]), None, loader.BatchSpec(6, 0, 0), augmentation=False)
        assert np.array_equal(ds.read(ds.real, rows), images[rows])
    assert loader._Layout.open(tmp_path / "packed.h5").filtered
