"""The oracle generator: the data stage's unlabelled pool, pseudo-labelled by the teacher. No stage reads the
pool's true labels: relabelling it in the source archive changes no byte of any output, and the
pseudo-labels are the teacher's predictions."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import data, generate, models, pseudolabel, shards, teacher, train_generator
from pipeline import params as params_mod
from pipeline.inference import predict_labels, to_float
from pipeline.labels import load_labels
from tests.helpers import DEMO_ARCHIVE, sample_settings

N_LABELLED, N_IMAGES, SHARD = 100, 200, 100
SETS = ("train", "val", "test", "unlabelled")


def oracle_config(tiny_params: dict, archive: Path) -> dict:
    cfg = tiny_params
    cfg["data"].update(archive=str(archive), md5=data.md5sum(archive), n_labelled=N_LABELLED)
    cfg["generate"].update(generators=["oracle"], n_images=N_IMAGES, shard_size=SHARD)
    return params_mod.validate(cfg)


def relabelled_archive(source: Path, out: Path, indices: np.ndarray) -> Path:
    """A copy of a CIFAR-10 python archive with training images `indices` (global) given label + 1 mod 10."""
    members, offset = {}, 0
    with tarfile.open(source, "r:*") as tar:
        for member in tar.getmembers():
            raw = tar.extractfile(member).read()
            if "data_batch_" in member.name:
                batch = pickle.loads(raw, encoding="latin1")
                labels = np.asarray(batch["labels"])
                mine = indices[(indices >= offset) & (indices < offset + len(labels))] - offset
                labels[mine] = (labels[mine] + 1) % 10
                batch["labels"] = labels.tolist()
                offset += len(labels)
                raw = pickle.dumps(batch, protocol=2)
            members[member.name] = raw
    with tarfile.open(out, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return out


def run_chain(cfg: dict, root: Path, teacher_model: Path | None = None) -> dict[str, Path]:
    """data -> teacher -> oracle train_generator -> generate -> pseudolabel in `root`, with relative paths
    (as the DAG runs them), so two roots write comparable files."""
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(cfg))
    params = "params.yaml"
    cwd = Path.cwd()
    try:
        os.chdir(root)
        data.main(["--params", params, "--out-dir", "data/cifar10"])
        teacher.main(["--params", params, "--train", "data/cifar10/train.h5", "--test", "data/cifar10/test.h5",
                      "--workdir", "work/teacher", "--out-model", "models/teacher/model.pt",
                      "--out-metrics", "results/teacher/metrics.json"])
        train_generator.main(["--params", params, "--generator", "oracle", "--train", "data/cifar10/train.h5",
                              "--workdir", "work/train_generator/oracle",
                              "--out", "models/generators/oracle/model.pt"])
        generate.main(["--params", params, "--generator", "oracle", "--model", "models/generators/oracle/model.pt",
                       "--shard", "all", "--out-dir", "data/generated/oracle"])
        pseudolabel.main(["--params", params, "--teacher", "models/teacher/model.pt",
                          "--shards", "data/generated/oracle", "--out-dir", "data/pseudolabels/oracle"])
    finally:
        os.chdir(cwd)
    files = {f"data/cifar10/{name}.h5": root / "data" / "cifar10" / f"{name}.h5" for name in SETS}
    files["models/teacher/model.pt"] = root / "models" / "teacher" / "model.pt"
    files["models/generators/oracle/model.pt"] = root / "models" / "generators" / "oracle" / "model.pt"
    for folder in ("data/generated/oracle", "data/pseudolabels/oracle"):
        files.update({f"{folder}/{p.name}": p for p in sorted((root / folder).glob("shard-*.h5"))})
    return files


@pytest.mark.slow
def test_no_stage_reads_the_pools_true_labels(tiny_params, tmp_path):
    cfg_a = oracle_config(tiny_params, DEMO_ARCHIVE)
    files_a = run_chain(cfg_a, tmp_path / "a")

    # Relabel every pool image whose label the labelled-subset draw never looked at (most of the pool).
    first_labels = data.read_batches(DEMO_ARCHIVE)[1][: cfg_a["data"]["n_train"]]
    subset = data.labelled_subset(first_labels, N_LABELLED, 10, cfg_a["base"]["seed"])
    unseen = np.setdiff1d(subset.pool, subset.examined)
    assert len(unseen) > 300
    archive_b = relabelled_archive(DEMO_ARCHIVE, tmp_path / "relabelled.tar.gz", unseen)
    assert not np.array_equal(data.read_batches(archive_b)[1], data.read_batches(DEMO_ARCHIVE)[1])
    files_b = run_chain(oracle_config(params_mod.validate(tiny_params), archive_b), tmp_path / "b")

    assert sorted(files_a) == sorted(files_b) and len(files_a) == 4 + 2 + 2 * (N_IMAGES // SHARD)
    for name in files_a:
        if name.startswith("data/cifar10/"):   # the data stage's sets name their archive and its md5
            same = shards.read_imageset(files_a[name])[0].tobytes() == shards.read_imageset(files_b[name])[0].tobytes()
            same = same and shards.read_attrs(files_a[name])["sha256"] == shards.read_attrs(files_b[name])["sha256"]
        else:                                  # every later stage's output, byte for byte
            same = files_a[name].read_bytes() == files_b[name].read_bytes()
        assert same, f"{name} depends on the pool's labels"

    pool_x, pool_y = shards.read_imageset(files_a["data/cifar10/unlabelled.h5"])
    assert (pool_y == -1).all() and len(pool_x) == cfg_a["data"]["n_train"] - N_LABELLED
    model = models.load_checkpoint(files_a["models/teacher/model.pt"])
    true_a, true_b = (data.read_batches(path)[1] for path in (DEMO_ARCHIVE, archive_b))
    rows = {row.tobytes(): i for i, row in enumerate(data.read_batches(DEMO_ARCHIVE)[0][: cfg_a["data"]["n_train"]])}
    for index in range(N_IMAGES // SHARD):
        shard = files_a[f"data/generated/oracle/shard-{index:05d}.h5"]
        images, labels = shards.read_imageset(shard)
        assert (labels == -1).all()
        assert np.array_equal(images, pool_x[index * SHARD:(index + 1) * SHARD])   # row i of the pool
        sidecar = load_labels(shard, files_a[f"data/pseudolabels/oracle/shard-{index:05d}.h5"])
        with torch.no_grad():
            expected = predict_labels(model, to_float(images), 50, torch.device("cpu"))
        assert np.array_equal(sidecar["label"], expected)
        # the same pseudo-labels under both archives' true labels, which differ on the relabelled images
        source = np.array([rows[row.tobytes()] for row in images])
        assert (true_a[source] != true_b[source]).any()


def test_more_images_than_the_pool_fails_naming_both(tiny_params, tmp_path, monkeypatch):
    cfg = oracle_config(tiny_params, DEMO_ARCHIVE)
    out = tmp_path / "data"
    sets = data.split(params_mod.section(data.DataConfig, cfg["data"]), 0, *data.read_batches(DEMO_ARCHIVE),
                      num_classes=10)
    for name in SETS:
        shards.write_imageset(out / f"{name}.h5", *sets[name])
    model = tmp_path / "oracle.pt"
    train_generator.train_generator("oracle", cfg["train_generator"], out / "train.h5", tmp_path / "work", model,
                                    0, "cpu")
    cfg["generate"]["n_images"] = 501
    with pytest.raises(params_mod.ParamsError, match=r"n_images: 501 asked, .* holds only 500 images"):
        generate.run(cfg, "oracle", model, "all", None, tmp_path / "shards")


def test_oracle_refuses_an_empty_or_labelled_pool(tiny_params, tmp_path):
    out = tmp_path / "data"
    images = np.zeros((4, 32, 32, 3), np.uint8)
    shards.write_imageset(out / "unlabelled.h5", images[:0], np.zeros(0, np.int64))
    with pytest.raises(SystemExit, match="unlabelled.h5: empty; set data.n_labelled"):
        train_generator.main(["--generator", "oracle", "--params", str(_params(tiny_params, tmp_path)),
                              "--train", str(out / "train.h5"), "--workdir", str(tmp_path / "w"),
                              "--out", str(tmp_path / "m.pt")])
    shards.write_imageset(out / "unlabelled.h5", images, np.arange(4))
    with pytest.raises(SystemExit, match="unlabelled.h5: holds labels"):
        train_generator.main(["--generator", "oracle", "--params", str(_params(tiny_params, tmp_path)),
                              "--train", str(out / "train.h5"), "--workdir", str(tmp_path / "w"),
                              "--out", str(tmp_path / "m.pt")])


def test_a_new_pool_is_caught_at_sampling(tiny_params, tmp_path):
    out = tmp_path / "data"
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    shards.write_imageset(out / "unlabelled.h5", images, np.full(4, -1))
    model = tmp_path / "m.pt"
    train_generator.train_generator("oracle", tiny_params["train_generator"], out / "train.h5", tmp_path / "w",
                                    model, 0, "cpu")
    settings = sample_settings(batch_size=2, sampler="ddim", sampling_steps=1)
    from pipeline import generators
    got, labels = generators.load("oracle", model, settings, torch.device("cpu")).sample(1, 3)
    assert np.array_equal(got, images[1:3]) and (labels == -1).all()
    with pytest.raises(shards.ShardError, match="has 4 images, asked for index 4"):
        generators.load("oracle", model, settings, torch.device("cpu")).sample(3, 5)
    shards.write_imageset(out / "unlabelled.h5", images[::-1].copy(), np.full(4, -1))
    with pytest.raises(shards.ShardError, match="changed since train_generator recorded it"):
        generators.load("oracle", model, settings, torch.device("cpu"))


def _params(cfg: dict, tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
