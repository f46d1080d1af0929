"""CIFAR-100 and SVHN follow CIFAR-10's path: official layouts read exactly, md5 per file, 100 classes
carried to every model, results/{dataset}_table.csv as the DAG's target.

The official files cannot be downloaded here, so the tests write small files in the official layouts
(CIFAR-100's pickled dicts with `fine_labels` in a tar; SVHN's MATLAB X / y with label 10 for digit 0).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import data, datasets, models, shards, teacher
from pipeline import params as P
from tests.helpers import BIN, DEMO_ARCHIVE, env, make_workdir


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> tuple[Path, dict]:
    """cifar-100-python.tar.gz layout: `train` and `test` pickles, CHW rows in `data`, `fine_labels`."""
    path = tmp_path_factory.mktemp("c100") / "cifar-100-python.tar.gz"
    truth = {"train": (fake_images(600, 0), np.arange(600) % 100), "test": (fake_images(200, 1), np.arange(200) % 100)}
    with tarfile.open(path, "w:gz") as tar:
        for name, (images, labels) in truth.items():
            rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
            payload = pickle.dumps({"data": rows, "fine_labels": labels.tolist(),
                                    "coarse_labels": (labels // 5).tolist(), "filenames": []})
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path, truth


@pytest.fixture(scope="module")
def svhn(tmp_path_factory) -> tuple[Path, dict]:
    """train_32x32.mat / test_32x32.mat: X is 32 x 32 x 3 x N, y is N x 1 with 10 for the digit 0."""
    from scipy.io import savemat

    folder = tmp_path_factory.mktemp("svhn")
    truth = {"train": (fake_images(300, 2), np.arange(300) % 10), "test": (fake_images(100, 3), np.arange(100) % 10)}
    for name, (images, labels) in truth.items():
        y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        savemat(folder / f"{name}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    return folder, truth


def test_cifar100_layout_is_read_exactly(cifar100):
    path, truth = cifar100
    train_x, train_y, test_x, test_y = data.read_batches(path, "cifar100")
    np.testing.assert_array_equal(train_x, truth["train"][0])
    np.testing.assert_array_equal(train_y, truth["train"][1])
    np.testing.assert_array_equal(test_x, truth["test"][0])
    assert set(np.unique(train_y)) == set(range(100)) and datasets.num_classes("cifar100") == 100


def test_svhn_layout_is_read_exactly_and_ten_means_zero(svhn):
    folder, truth = svhn
    spec = datasets.get("svhn")
    train_x, train_y, test_x, test_y = spec.read([folder / name for name in spec.files])
    np.testing.assert_array_equal(train_x, truth["train"][0])
    np.testing.assert_array_equal(test_x, truth["test"][0])
    np.testing.assert_array_equal(train_y, truth["train"][1])
    assert train_y.min() == 0 and train_y.max() == 9


def test_a_cifar10_archive_is_refused_as_cifar100():
    with pytest.raises(datasets.ArchiveError, match="cifar-100-python/train"):
        data.read_batches(DEMO_ARCHIVE, "cifar100")


def params_for(tiny_params: dict, dataset: str, archive: Path | str, md5_value) -> dict:
    cfg = dict(tiny_params)
    cfg["base"] = {**cfg["base"], "dataset": dataset}
    cfg["data"] = {**cfg["data"], "archive": str(archive), "md5": md5_value, "n_train": 0, "n_test": 0,
                   "val_size": 50}
    return P.validate(cfg)


def run_data(params: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.data", "--params", str(params), "--out-dir", str(out),
                           "--raw-dir", str(out.parent / "raw")], capture_output=True, text=True)


def test_data_stage_writes_cifar100_sets_with_their_class_count(cifar100, tiny_params, write_params, tmp_path):
    path, truth = cifar100
    params = write_params(params_for(tiny_params, "cifar100", path, md5(path)))
    result = run_data(params, tmp_path / "cifar100")
    assert result.returncode == 0, result.stderr
    train = shards.read_imageset(tmp_path / "cifar100" / "train.h5")
    assert len(train[0]) == 550 and shards.read_attrs(tmp_path / "cifar100" / "train.h5")["num_classes"] == 100
    assert len(shards.read_imageset(tmp_path / "cifar100" / "test.h5")[0]) == 200


def test_svhn_from_a_url_prefix_checks_each_file(svhn, tiny_params, write_params, tmp_path):
    folder, truth = svhn
    sums = {name: md5(folder / name) for name in datasets.get("svhn").files}
    params = write_params(params_for(tiny_params, "svhn", folder.as_uri() + "/", sums))
    result = run_data(params, tmp_path / "svhn")
    assert result.returncode == 0, result.stderr
    test = shards.read_imageset(tmp_path / "svhn" / "test.h5")
    np.testing.assert_array_equal(test[0], truth["test"][0])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(sums)   # downloaded once each

    wrong = {**sums, "test_32x32.mat": "0" * 32}
    params = write_params(params_for(tiny_params, "svhn", folder, wrong), "wrong.yaml")
    result = run_data(params, tmp_path / "svhn-wrong")
    assert result.returncode != 0
    assert "test_32x32.mat" in result.stderr and "md5" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "svhn-wrong").exists()


@pytest.mark.parametrize("dataset, md5_value, fragment", [
    ("svhn", "0" * 32, "give a mapping"),
    ("cifar10", {"cifar-10-python.tar.gz": "0" * 32}, "as a string"),
    ("svhn", {"train_32x32.mat": "0" * 32}, "test_32x32.mat"),
])
def test_md5_shape_must_fit_the_dataset(tiny_params, dataset, md5_value, fragment):
    cfg = dict(tiny_params)
    cfg["base"] = {**cfg["base"], "dataset": dataset}
    cfg["data"] = {**cfg["data"], "md5": md5_value}
    with pytest.raises(P.ParamsError, match=f"data.md5.*{fragment}"):
        P.validate(cfg)


def test_dataset_presets_carry_the_official_sources():
    for name, spec in datasets.DATASETS.items():
        cfg = P.preset("paper", dataset=name)
        assert cfg["base"]["dataset"] == name and cfg["data"]["md5"] == spec.md5
        assert datasets.sources(spec, cfg["data"]["archive"])[0].startswith(spec.url)


@pytest.mark.slow
def test_cifar100_teacher_and_robust_model_have_100_outputs(cifar100, tiny_params, write_params, tmp_path):
    path, _ = cifar100
    cfg = params_for(tiny_params, "cifar100", path, md5(path))
    cfg["teacher"] = {**cfg["teacher"], "epochs": 1}
    params = write_params(cfg)
    assert run_data(params, tmp_path / "data").returncode == 0
    teacher.main(["--params", str(params), "--train", str(tmp_path / "data" / "train.h5"),
                  "--test", str(tmp_path / "data" / "test.h5"), "--workdir", str(tmp_path / "work"),
                  "--out-model", str(tmp_path / "teacher.pt"), "--out-metrics", str(tmp_path / "teacher.json")])
    assert models.load_checkpoint(tmp_path / "teacher.pt").head.out_features == 100

    from pipeline import train_robust as tr
    robust = P.section(tr.TrainRobustConfig, {**cfg["train_robust"], "epochs": 1, "warmup_epochs": 0,
                                              "epoch_size": 64, "batch_size": 32, "attack_steps": 1})
    result = tr.train_robust(robust, 0, "cpu", "baseline", tmp_path / "data" / "train.h5",
                             tmp_path / "data" / "val.h5", [], [], tmp_path / "robust", progress=False,
                             num_classes=100)
    assert result.ema_model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert result.metrics.num_classes == 100


@pytest.mark.slow
def test_snakemake_targets_the_datasets_table(tmp_path):
    """A dry run of the DAG on SVHN: every stage planned, the target is results/svhn_table.csv."""
    workdir = make_workdir(tmp_path)
    folder = tmp_path / "svhn-files"
    folder.mkdir()
    for name in datasets.get("svhn").files:
        (folder / name).write_bytes(b"placeholder for a dry run")
    cfg = yaml.safe_load((workdir / "params.yaml").read_text())
    cfg = params_for(cfg, "svhn", folder, {name: "0" * 32 for name in datasets.get("svhn").files})
    (workdir / "params.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([str(BIN / "snakemake"), "-n", "--quiet", "rules"], cwd=workdir, env=env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = subprocess.run([str(BIN / "snakemake"), "--summary"], cwd=workdir, env=env(),
                             capture_output=True, text=True)
    assert "results/svhn_table.csv" in summary.stdout and "results/cifar10_table.csv" not in summary.stdout
    assert "data/svhn/train.h5" in summary.stdout
