"""Pseudo-label sidecars: both CLI forms give the same bytes, sidecars align with shards, misalignment is caught."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline import models, pseudolabel
from pipeline.labels import load_labels
from pipeline.shards import ShardError, read_attrs, read_imageset, write_imageset


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    models.save_checkpoint(path, models.build("small_cnn"), "small_cnn", 10)
    return path


@pytest.fixture
def shard_dir(cifar_sets, tmp_path):
    x, y = read_imageset(cifar_sets["test"])
    out = tmp_path / "generated"
    write_imageset(out / "shard-00000.h5", x[:60], y[:60], {"generator": "conditional"})  # known labels
    write_imageset(out / "shard-00001.h5", x[60:100], np.full(40, -1), {"generator": "unconditional"})
    return out


def test_both_cli_forms_write_identical_aligned_sidecars(tiny_params, write_params, teacher_file, shard_dir, tmp_path):
    params = write_params(tiny_params)
    one = tmp_path / "one" / "shard-00000.h5"
    pseudolabel.main(["--params", str(params), "--teacher", str(teacher_file),
                      "--shard", str(shard_dir / "shard-00000.h5"), "--out", str(one)])
    pseudolabel.main(["--params", str(params), "--teacher", str(teacher_file),
                      "--shard-dir", str(shard_dir), "--out-dir", str(tmp_path / "all")])
    assert one.read_bytes() == (tmp_path / "all" / "shard-00000.h5").read_bytes()

    arrays = load_labels(shard_dir / "shard-00000.h5", one)
    assert arrays["label"].dtype == np.int64 and arrays["confidence"].dtype == np.float32
    assert len(arrays["label"]) == 60 and "probs" not in arrays
    assert np.all((arrays["confidence"] >= 0.1 - 1e-6) & (arrays["confidence"] <= 1))  # max of 10 probs
    # The labels are the teacher's argmax on exactly these images.
    model = models.load_checkpoint(teacher_file)
    x, y = read_imageset(shard_dir / "shard-00000.h5")
    with torch.no_grad():
        expected = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert np.array_equal(arrays["label"], expected)
    attrs = read_attrs(one)
    assert attrs["label_agreement"] == pytest.approx(float((expected == y).mean()))
    assert attrs["n_known_labels"] == 60 and attrs["shard"] == "shard-00000.h5"
    unlabelled = read_attrs(tmp_path / "all" / "shard-00001.h5")
    assert unlabelled["n_known_labels"] == 0 and "label_agreement" not in unlabelled


def test_misaligned_sidecar_is_detected_naming_both_files(tiny_params, write_params, teacher_file, shard_dir, tmp_path):
    params = write_params(tiny_params)
    out = tmp_path / "labels"
    pseudolabel.main(["--params", str(params), "--teacher", str(teacher_file),
                      "--shard-dir", str(shard_dir), "--out-dir", str(out)])
    with pytest.raises(ShardError, match="shard-00001.h5.*shard-00000.h5|shard-00000.h5.*shard-00001.h5"):
        load_labels(shard_dir / "shard-00000.h5", out / "shard-00001.h5")
    # A regenerated shard (new bytes under the same name) no longer matches its old sidecar.
    x, y = read_imageset(shard_dir / "shard-00000.h5")
    write_imageset(shard_dir / "shard-00000.h5", x[::-1].copy(), y[::-1].copy())
    with pytest.raises(ShardError, match="do not match"):
        load_labels(shard_dir / "shard-00000.h5", out / "shard-00000.h5")
    with pytest.raises(ShardError, match="another teacher"):
        load_labels(shard_dir / "shard-00001.h5", out / "shard-00001.h5", teacher_sha256="0" * 64)


def test_save_probs_and_corrupt_sidecar(tiny_params, write_params, teacher_file, shard_dir, tmp_path):
    tiny_params["pseudolabel"]["save_probs"] = True
    params = write_params(tiny_params)
    out = tmp_path / "labels" / "shard-00001.h5"
    pseudolabel.main(["--params", str(params), "--teacher", str(teacher_file),
                      "--shard", str(shard_dir / "shard-00001.h5"), "--out", str(out)])
    arrays = load_labels(shard_dir / "shard-00001.h5", out)
    assert arrays["probs"].shape == (40, 10)
    assert np.allclose(arrays["probs"].sum(1), 1, atol=1e-5)
    assert np.array_equal(arrays["probs"].argmax(1), arrays["label"])
    with h5py.File(out, "r+") as h5:
        h5["label"][0] = (h5["label"][0] + 1) % 10
    with pytest.raises(ShardError, match="checksum"):
        load_labels(shard_dir / "shard-00001.h5", out)
