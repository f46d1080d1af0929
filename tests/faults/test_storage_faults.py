"""Storage faults on the shared writers: a full disk and two writers racing for the same shard.

Disk full uses a real 1 MiB tmpfs (needs root and mount; skipped with the reason otherwise).
"""

from __future__ import annotations

import multiprocessing
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, shards


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or 'not permitted'}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_disk_full_while_writing_a_shard_keeps_the_previous_one(tiny_disk):
    path = tiny_disk / "shard-00000.h5"
    small = images(20, 0)  # 60 KB: fits
    shards.write_imageset(path, *small)
    with pytest.raises(OSError):
        shards.write_imageset(path, *images(400, 1))  # 1.2 MB: cannot fit
    assert np.array_equal(shards.read_imageset(path)[0], small[0])  # previous good file intact
    assert [p.name for p in tiny_disk.iterdir()] == ["shard-00000.h5"]  # no temporary left behind


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(tiny_disk):
    checkpoint.save(tiny_disk, 1, {"weights": torch.zeros(1000)})
    with pytest.raises((OSError, RuntimeError)):   # torch's archive writer raises RuntimeError
        checkpoint.save(tiny_disk, 2, {"weights": torch.zeros(1_000_000)})  # 4 MB
    state = checkpoint.latest(tiny_disk)
    assert state is not None and state["weights"].numel() == 1000


def _write(path: str, seed: int, barrier) -> None:
    barrier.wait()
    for _ in range(5):
        shards.write_imageset(Path(path), *images(300, seed))


@pytest.mark.slow
def test_concurrent_writers_leave_one_valid_shard(tmp_path):
    """A requeued job and its zombie writing the same shard: one complete file, never an interleaving."""
    path = tmp_path / "shard-00007.h5"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    writers = [context.Process(target=_write, args=(str(path), seed, barrier)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    got, _ = shards.read_imageset(path)  # verifies the checksum
    assert any(np.array_equal(got, images(300, seed)[0]) for seed in (1, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00007.h5"]
