"""Complementarity/coverage on constructed sets with known answers; selection is class balanced; LPIPS is exact."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pipeline import analysis, features, models, quality
from pipeline import select as select_mod
from pipeline.shards import read_attrs, read_imageset, write_arrays, write_imageset


def cluster(rng, n, centre, dim=16, spread=0.05):
    return features.unit_normalise(centre + spread * rng.standard_normal((n, dim)))


def test_copies_of_train_are_train_neighbours_and_cover_train():
    rng = np.random.default_rng(0)
    real = cluster(rng, 120, np.ones(16))
    train, test = real[:60], real[60:]
    result = quality.complementarity_coverage(train, test, train.copy(), block_size=7)
    assert result["complementarity"] == {"train": 1.0, "test": 0.0, "self": 0.0}
    assert result["coverage"]["train"] == 1.0
    assert sum(result["complementarity"].values()) == pytest.approx(1.0)


def test_far_away_generator_is_its_own_neighbour_and_covers_nothing():
    rng = np.random.default_rng(1)
    centre = np.zeros(16)
    centre[0] = 1
    far = np.zeros(16)
    far[1] = 1
    train, test = cluster(rng, 50, centre), cluster(rng, 50, centre)
    result = quality.complementarity_coverage(train, test, cluster(rng, 50, far), block_size=16)
    assert result["complementarity"]["self"] == 1.0
    assert result["coverage"] == {"train": 0.0, "test": 0.0}


def test_a_second_draw_of_the_same_distribution_is_about_a_third_each():
    rng = np.random.default_rng(2)
    train, test, gen = (features.unit_normalise(rng.standard_normal((400, 8))) for _ in range(3))
    result = quality.complementarity_coverage(train, test, gen, block_size=64)
    for share in result["complementarity"].values():
        assert 0.25 < share < 0.42
    for share in result["coverage"].values():
        assert 0.4 < share < 0.6


def test_blocked_search_equals_brute_force():
    rng = np.random.default_rng(3)
    q, p = rng.standard_normal((37, 5)), rng.standard_normal((23, 5))
    brute = ((q[:, None] - p[None]) ** 2).sum(-1)
    assert np.allclose(quality.min_sq_dist(q, p, 4), brute.min(1), atol=1e-4)
    selfd = ((q[:, None] - q[None]) ** 2).sum(-1) + np.diag(np.full(37, np.inf))
    assert np.allclose(quality.min_sq_dist(q, q, 5, exclude_self=True), selfd.min(1), atol=1e-4)


@pytest.mark.slow
def test_cli_on_real_images_copies_far_and_summary(tiny_params, write_params, cifar_sets, tmp_path):
    """Teacher feature space end to end: copies of train vs. flat grey images far from everything."""
    tiny_params["analysis"]["n_samples"] = 2000  # >= every set here, so every image is used
    params = write_params(tiny_params)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    models.save_checkpoint(teacher, models.build("small_cnn"), "small_cnn", 10)
    x, y = read_imageset(cifar_sets["val"])  # 100 real images used as "train" to keep this fast
    small_train = tmp_path / "train.h5"
    write_imageset(small_train, x, y)
    write_imageset(tmp_path / "copy" / "shard-00000.h5", x[:60], y[:60])
    write_imageset(tmp_path / "copy" / "shard-00001.h5", x[60:], np.full(40, -1))
    flat = np.repeat(np.linspace(0, 255, 50).astype(np.uint8), 32 * 32 * 3).reshape(50, 32, 32, 3)
    write_imageset(tmp_path / "far" / "shard-00000.h5", flat, np.full(50, -1))
    test = tmp_path / "test.h5"
    tx, ty = read_imageset(cifar_sets["test"])
    write_imageset(test, tx[:100], ty[:100])
    sidecar_labels = np.arange(100) % 10   # pseudo-labels of the copies: sidecars as pseudolabel writes them
    for i, rows in enumerate((slice(0, 60), slice(60, 100))):
        shard = tmp_path / "copy" / f"shard-{i:05d}.h5"
        write_arrays(tmp_path / "labels" / shard.name,
                     {"label": sidecar_labels[rows].astype(np.int64),
                      "confidence": np.linspace(0.1, 1, 100, dtype=np.float32)[rows]},
                     {"shard": shard.name, "shard_sha256": read_attrs(shard)["sha256"]})
    out = tmp_path / "results"
    for name in ("copy", "far"):
        labels = ["--labels", str(tmp_path / "labels")] if name == "copy" else []
        analysis.main(["--params", str(params), "--generator", name, "--train", str(small_train),
                       "--test", str(test), "--teacher", str(teacher), "--shards", str(tmp_path / name), *labels,
                       "--out", str(out / f"{name}.json"), "--out-figure", str(tmp_path / "fig" / f"{name}.png")])
    copy = json.loads((out / "copy.json").read_text())
    assert copy["complementarity"]["train"] == 1.0 and copy["coverage"]["train"] == 1.0
    assert copy["n"] == {"train": 100, "test": 100, "generated": 100}
    assert copy["teacher"]["n_known_labels"] == 60
    quality = copy["quality"]   # the copies are the whole training set: FID 0, every image memorised
    assert quality["feature_space"] == "teacher" and quality["n"] == {"generated": 100, "train": 100, "test": 100}
    assert quality["generated"]["fid"] == pytest.approx(0, abs=1e-3)
    assert quality["generated"]["precision"] == quality["generated"]["recall"] == 1.0
    assert quality["leakage"]["pixels"]["train"]["share"] == 1.0 == quality["leakage"]["features"]["train"]["share"]
    # real held-out images are about as near the test set as the calibration's 1% (here 1 of 100)
    assert quality["leakage"]["pixels"]["test"]["share"] <= 0.03
    assert quality["labels"]["source"] == "pseudolabel sidecars"
    assert quality["labels"]["histogram"] == [10] * 10 and sum(quality["labels"]["confidence_counts"]) == 100
    assert quality["per_class"]["n_generated"] == [10] * 10
    assert sum(quality["per_class_conditioning"]["n_generated"]) == 60   # only the shard with known labels
    assert (tmp_path / "fig" / "copy.png").read_bytes()[:4] == b"\x89PNG"
    far = json.loads((out / "far.json").read_text())
    assert far["complementarity"]["self"] > 0.9 and far["coverage"]["train"] < 0.1
    analysis.main(["--params", str(params), "--generator", "mixup", "--train", str(small_train),
                   "--test", str(test), "--teacher", str(teacher), "--out", str(out / "mixup.json")])
    mixup = json.loads((out / "mixup.json").read_text())
    assert mixup["mixup_alpha"] == tiny_params["analysis"]["mixup_alpha"]
    # Mixup of the (fully sampled) training set with small alpha stays next to its training images.
    assert mixup["complementarity"]["train"] > 0.5
    analysis.main(["summary", "--inputs", *(str(p) for p in sorted(out.glob("*.json"))),
                   "--out-csv", str(tmp_path / "c.csv"), "--out-figure", str(tmp_path / "fig" / "c.png")])
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [r["generator"] for r in rows] == ["copy", "far", "mixup", analysis.REFERENCE]
    assert float(rows[0]["complementarity_train"]) == 1.0
    fid = {r["generator"]: float(r["fid"]) for r in rows}
    # copies of train < the real held-out split < flat grey images, in the teacher's features
    assert fid["copy"] < fid[analysis.REFERENCE] < fid["far"]
    assert {r["quality_feature_space"] for r in rows} == {"teacher"}
    assert rows[-1]["complementarity_train"] == "" and float(rows[-1]["fid_reference"]) == fid[analysis.REFERENCE]
    assert (tmp_path / "fig" / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_inception_weights_stop_the_stage_before_any_work(tiny_params, write_params, tmp_path):
    tiny_params["analysis"]["inception_weights"] = str(tmp_path / "absent.pth")
    params = write_params(tiny_params)
    teacher = tmp_path / "teacher.pt"
    models.save_checkpoint(teacher, models.build("small_cnn"), "small_cnn", 10)
    with pytest.raises(SystemExit, match="analysis.inception_weights: .*absent.pth not found"):
        analysis.main(["--params", str(params), "--generator", "mixup", "--train", str(tmp_path / "no.h5"),
                       "--test", str(tmp_path / "no.h5"), "--teacher", str(teacher), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()


def test_mixup_blends_are_made_of_train_pool_images():
    """Every blend's two sources are members of the pool it was given, and the blend is their mix."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(40, 2, 2, 3), dtype=np.uint8)
    y = np.arange(40) % 10
    pool = np.sort(rng.choice(40, size=9, replace=False))
    mixed, labels, sources = analysis.mixup_sample(x, y, pool, alpha=0.3, seed=0)
    assert mixed.shape == (9, 2, 2, 3) and sources.shape == (9, 2)
    assert set(sources.ravel().tolist()) <= set(pool.tolist())
    i, j = sources.T
    # lam per blend from the first pixel where the sources differ; the whole blend must agree with it
    for k in range(9):
        a, b = x[i[k]].astype(np.float32) / 255, x[j[k]].astype(np.float32) / 255
        if np.array_equal(a, b):
            assert np.allclose(mixed[k], a) and labels[k] == y[i[k]]
            continue
        d = np.flatnonzero((a - b).ravel())[0]
        lam = (mixed[k].ravel()[d] - b.ravel()[d]) / (a.ravel()[d] - b.ravel()[d])
        assert np.allclose(mixed[k], lam * a + (1 - lam) * b, atol=1e-5)
        assert labels[k] == (y[i[k]] if lam >= 0.5 else y[j[k]])


@pytest.mark.slow
def test_mixup_row_finds_its_sources_in_the_train_pool(tiny_params, write_params, cifar_sets, tmp_path):
    """Known answer: with alpha tiny a blend is its dominant image, which is in the searched train pool,
    so nearly every blend's nearest neighbour is in train, although the pool (40) is a small sample of
    the training set (1,000). Blends drawn from the whole training set would find their source in the
    pool only about 4% of the time."""
    tiny_params["analysis"].update(n_samples=40, feature_space="pixels", mixup_alpha=0.001)
    params = write_params(tiny_params)
    x, y = read_imageset(cifar_sets["train"])
    train = tmp_path / "train.h5"
    write_imageset(train, x[:1000], y[:1000])
    out = tmp_path / "mixup.json"
    with pytest.raises(SystemExit, match="--teacher is required"):   # quality metrics need a feature space
        analysis.main(["--params", str(params), "--generator", "mixup", "--train", str(train),
                       "--test", str(cifar_sets["test"]), "--out", str(out)])
    teacher = tmp_path / "teacher.pt"
    models.save_checkpoint(teacher, models.build("small_cnn"), "small_cnn", 10)
    analysis.main(["--params", str(params), "--generator", "mixup", "--train", str(train),
                   "--test", str(cifar_sets["test"]), "--teacher", str(teacher), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["n"] == {"train": 40, "test": 40, "generated": 40}
    assert result["complementarity"]["train"] >= 0.95
    assert result["coverage"]["train"] >= 0.5  # a pool image that is some blend's dominant source is covered


def test_generated_sample_is_seeded_and_reads_across_shards(tmp_path):
    images = np.arange(30 * 4 * 4 * 3, dtype=np.int64).reshape(30, 4, 4, 3).astype(np.uint8)
    labels = np.arange(30)
    for i in range(3):
        write_imageset(tmp_path / f"shard-{i:05d}.h5", images[10 * i:10 * (i + 1)], labels[10 * i:10 * (i + 1)])
    x1, y1 = analysis.generated_sample([tmp_path], 7, 0, "g")
    x2, y2 = analysis.generated_sample([tmp_path], 7, 0, "g")
    assert np.array_equal(y1, y2) and len(set(y1.tolist())) == 7
    assert np.array_equal(x1, images[y1])  # rows come from the right shard
    assert not np.array_equal(analysis.generated_sample([tmp_path], 7, 1, "g")[1], y1)


def test_selection_is_class_balanced_and_most_confident(tiny_params, write_params, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.choice(10, size=600, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())
    conf = rng.uniform(0.1, 1, size=600).astype(np.float32)
    for i in range(3):
        part = slice(200 * i, 200 * (i + 1))
        write_arrays(tmp_path / "labels" / f"shard-{i + 4:05d}.h5",
                     {"label": labels[part].astype(np.int64), "confidence": conf[part]}, {"teacher_sha256": "t"})
    tiny_params["select"] = {"class_balance": True, "top_fraction": 0.5}
    params = write_params(tiny_params)
    select_mod.main(["--params", str(params), "--labels-dir", str(tmp_path / "labels"),
                     "--out", str(tmp_path / "sel" / "index.npy")])
    index = np.load(tmp_path / "sel" / "index.npy")
    assert index.dtype == np.int64 and index.shape[1] == 2 and set(index[:, 0]) <= {4, 5, 6}
    flat = (index[:, 0] - 4) * 200 + index[:, 1]
    counts = np.bincount(labels[flat], minlength=10)
    smallest = int(np.ceil(0.5 * np.bincount(labels, minlength=10).min()))
    assert (counts == smallest).all()
    for c in range(10):  # the kept ones are the most confident of their class
        members = np.flatnonzero(labels == c)
        kept = flat[labels[flat] == c]
        assert conf[kept].min() >= np.sort(conf[members])[::-1][smallest - 1]
    unbalanced = select_mod.select(select_mod.SelectConfig(False, 1.0), labels, conf, 10)
    assert np.array_equal(unbalanced, np.arange(600))


def test_a_selection_that_keeps_nothing_fails_naming_the_cause(tiny_params, write_params, tmp_path):
    """An untrained generator's samples all get one teacher label: class balance would keep none of them."""
    write_arrays(tmp_path / "labels" / "shard-00000.h5",
                 {"label": np.r_[np.ones(99), [9]].astype(np.int64), "confidence": np.ones(100, np.float32)},
                 {"teacher_sha256": "t"})
    tiny_params["select"] = {"class_balance": True, "top_fraction": 1.0}
    args = ["--params", str(write_params(tiny_params)), "--labels-dir", str(tmp_path / "labels"),
            "--out", str(tmp_path / "sel" / "index.npy")]
    with pytest.raises(SystemExit, match=r"keeps none of 100 images \(select.class_balance .*\[0, 99, 0"):
        select_mod.main(args)
    assert not (tmp_path / "sel" / "index.npy").exists()
    tiny_params["select"]["class_balance"] = False
    select_mod.main(["--params", str(write_params(tiny_params)), *args[2:]])
    assert len(np.load(tmp_path / "sel" / "index.npy")) == 100


def test_lpips_embedding_distance_is_lpips(tmp_path):
    torch.manual_seed(0)
    net = features.LPIPSEmbedding()
    for weight in net.lin:
        weight.data = torch.rand_like(weight)
    # Save in the lpips package's full state-dict layout (net.sliceK.N.*, linK.model.1.weight).
    state = {}
    for (start, stop), k in zip(features.LPIPS_SLICES, range(1, 6)):
        for i in range(start, stop):
            for name, value in net.features[i].state_dict().items():
                state[f"net.slice{k}.{i}.{name}"] = value
    for k, weight in enumerate(net.lin):
        state[f"lin{k}.model.1.weight"] = weight.detach().view(1, -1, 1, 1)
    torch.save(state, tmp_path / "lpips_alex.pt")
    loaded = features.load_lpips(tmp_path / "lpips_alex.pt")
    x, y = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    # Reference: lpips.LPIPS.forward, written out (normalise channels, squared diff, 1x1 conv, mean over hw).
    def acts(img):
        h = ((img * 2 - 1) - loaded.shift) / loaded.scale
        outs = []
        for start, stop in features.LPIPS_SLICES:
            for layer in loaded.features[start:stop]:
                h = layer(h)
            outs.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return outs
    with torch.no_grad():
        ref = sum(((a - b) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
                  for a, b, w in zip(acts(x), acts(y), loaded.lin))
        emb = ((loaded(x) - loaded(y)) ** 2).sum(1)
    assert torch.allclose(emb, ref, rtol=1e-4)
    with pytest.raises(features.FeatureError, match="never downloaded"):
        features.load_lpips(tmp_path / "missing.pth")
