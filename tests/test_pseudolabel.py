"""Pseudo-label sidecars: both CLI forms give the same bytes, sidecars align with shards, misalignment is caught;
label_source generator trains on a conditional shard's own classes, keeping the teacher's prediction."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from pipeline import models, pseudolabel
from pipeline.labels import load_labels
from pipeline.select import SelectConfig, select_dir
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
                      "--shards", str(shard_dir), "--out-dir", str(tmp_path / "all")])
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
                      "--shards", str(shard_dir), "--out-dir", str(out)])
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


def teacher_probs(teacher_file, shard):
    model = models.load_checkpoint(teacher_file)
    x, _ = read_imageset(shard)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255), 1).numpy()


def test_label_source_generator_keeps_known_labels_and_the_teachers_prediction(tiny_params, write_params,
                                                                               teacher_file, tmp_path):
    """A conditional shard's own class is the training label where known (-1 rows take the teacher's); the
    teacher's argmax and max softmax stay recorded, and `confidence` is the teacher's probability of the
    label, which select ranks by (DM-Improves-AT's selection score)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    conditioning = rng.integers(0, 10, 50)
    conditioning[::3] = -1  # rows an unconditional part of the shard leaves to the teacher
    shard = tmp_path / "generated" / "shard-00000.h5"
    write_imageset(shard, images, conditioning, {"generator": "edm"})
    probs = teacher_probs(teacher_file, shard)
    teacher = probs.argmax(1)
    assert (teacher[conditioning >= 0] != conditioning[conditioning >= 0]).any()  # the choice matters here

    out = {}
    for source in ("teacher", "generator"):
        tiny_params["pseudolabel"]["label_source"] = source
        out[source] = tmp_path / source / "shard-00000.h5"
        pseudolabel.main(["--params", str(write_params(tiny_params)), "--teacher", str(teacher_file),
                          "--shard", str(shard), "--out", str(out[source])])
    by_teacher, by_generator = load_labels(shard, out["teacher"]), load_labels(shard, out["generator"])
    expected = np.where(conditioning >= 0, conditioning, teacher)
    assert np.array_equal(by_generator["label"], expected)
    assert np.array_equal(by_generator["teacher_label"], teacher)
    assert np.allclose(by_generator["teacher_confidence"], probs.max(1), atol=1e-6)
    assert np.allclose(by_generator["confidence"], probs[np.arange(50), expected], atol=1e-6)
    assert np.array_equal(by_teacher["label"], teacher) and "teacher_label" not in by_teacher
    assert np.allclose(by_teacher["confidence"], probs.max(1), atol=1e-6)
    assert read_attrs(out["generator"])["label_source"] == "generator"
    assert "label_source" not in read_attrs(out["teacher"])  # teacher sidecars: the format they always had
    assert read_attrs(out["generator"])["label_agreement"] == read_attrs(out["teacher"])["label_agreement"]

    # select reads the chosen labels: per class counts are the generator's, ranks by p(label)
    cfg = SelectConfig(class_balance=False, top_fraction=0.5)
    index, stats = select_dir(cfg, tmp_path / "generator")
    assert stats["per_class_before"] == np.bincount(expected, minlength=10).tolist()
    confidence = probs[np.arange(50), expected]
    for c in range(10):
        members = np.flatnonzero(expected == c)
        kept = set(index[:, 1][expected[index[:, 1]] == c].tolist())
        assert kept == set(members[np.argsort(-confidence[members], kind="stable")][:math.ceil(len(members) / 2)])


def test_label_source_generator_rejects_labels_the_teacher_has_no_class_for(tiny_params, write_params,
                                                                            teacher_file, tmp_path):
    shard = tmp_path / "generated" / "shard-00000.h5"
    write_imageset(shard, np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 3, 12, -1]))
    tiny_params["pseudolabel"]["label_source"] = "generator"
    with pytest.raises(SystemExit, match=r"^error: .*shard-00000\.h5: label 12 outside the teacher's 10 classes"):
        pseudolabel.main(["--params", str(write_params(tiny_params)), "--teacher", str(teacher_file),
                          "--shard", str(shard), "--out", str(tmp_path / "labels" / "shard-00000.h5")])
