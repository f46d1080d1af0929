"""Generated-data quality: known answers for the Fréchet distance, precision/recall and density/coverage,
our Inception pipeline against torch-fidelity's own call, and leakage on planted copies of test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from pipeline import models
from pipeline import quality as q
from pipeline.shards import read_imageset

# --- Fréchet distance ---


def test_frechet_distance_of_gaussians_is_the_closed_form():
    """Diagonal covariances: ||m1 - m2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2; rotated: invariant."""
    rng = np.random.default_rng(0)
    d = 6
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    closed = float(((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    stats = lambda m, s: {"mu": m, "sigma": s}
    assert q.frechet_distance(stats(m1, np.diag(a)), stats(m2, np.diag(b))) == pytest.approx(closed, rel=1e-9)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))   # same distance in any orthonormal basis
    rotated = q.frechet_distance(stats(rot @ m1, rot @ np.diag(a) @ rot.T), stats(rot @ m2, rot @ np.diag(b) @ rot.T))
    assert rotated == pytest.approx(closed, rel=1e-7)


def test_fid_of_a_set_with_itself_is_zero_and_of_shifted_samples_is_the_shift():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    assert q.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, 0, 0, 0, 4.0], dtype=np.float32)
    assert q.fid(x + shift, x) == pytest.approx(25.0, rel=1e-4)   # same covariance: only ||shift||^2
    assert q.fid(x[:1], x) is None


# --- precision / recall, density / coverage ---


def test_precision_recall_with_known_support_overlap():
    """Real on [0, 1]^2, generated on [0.5, 1.5] x [0, 1]: half of each lies in the other's support, so
    precision and recall are both about one half; a generated copy of real gives 1 and 1; a far cloud 0."""
    rng = np.random.default_rng(2)
    real = rng.uniform(0, 1, (2000, 2)).astype(np.float32)
    shifted = (rng.uniform(0, 1, (2000, 2)) + [0.5, 0]).astype(np.float32)
    half = q.precision_recall(shifted, real, k=3, block_size=256)
    assert half["precision"] == pytest.approx(0.5, abs=0.04) and half["recall"] == pytest.approx(0.5, abs=0.04)
    same = q.precision_recall(real.copy(), real, k=3, block_size=300)
    assert same == {"precision": 1.0, "recall": 1.0}
    far = q.precision_recall(real + 10, real, k=3, block_size=512)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_blocks_do_not_change_the_answer():
    rng = np.random.default_rng(3)
    real, gen = rng.standard_normal((300, 4)).astype(np.float32), rng.standard_normal((250, 4)).astype(np.float32)
    assert q.precision_recall(gen, real, 3, 7) == q.precision_recall(gen, real, 3, 10_000)


def test_density_coverage_known_answers():
    """Copies of real: ball j holds exactly its own copy and its k neighbours' copies, so the count is
    N (k + 1) and density (k + 1) / k; every ball holds its copy (coverage 1). An independent draw of the
    same distribution has density about 1; half the support gives about one half of both."""
    rng = np.random.default_rng(4)
    real = rng.uniform(0, 1, (1500, 2)).astype(np.float32)
    same = q.density_coverage(real.copy(), real, k=3, block_size=128)
    assert same["coverage"] == 1.0 and same["density"] == pytest.approx(4 / 3)
    fresh = q.density_coverage(rng.uniform(0, 1, (1500, 2)).astype(np.float32), real, k=3, block_size=128)
    assert fresh["density"] == pytest.approx(1.0, abs=0.08)
    shifted = (rng.uniform(0, 1, (1500, 2)) + [0.5, 0]).astype(np.float32)
    half = q.density_coverage(shifted, real, k=3, block_size=100)
    assert half["coverage"] == pytest.approx(0.5, abs=0.05) and half["density"] == pytest.approx(0.5, abs=0.06)
    assert q.density_coverage(real + 10, real, 3, 64) == {"density": 0.0, "coverage": 0.0}


def test_knn_equals_brute_force():
    rng = np.random.default_rng(5)
    x, p = rng.standard_normal((41, 6)), rng.standard_normal((29, 6))
    brute = ((x[:, None] - p[None]) ** 2).sum(-1)
    values, index = q.knn_sq_dist(x, p, 4, block_size=5)
    assert np.allclose(values, np.sort(brute, 1)[:, :4], atol=1e-4)
    assert np.array_equal(index[:, 0], brute.argmin(1))
    self_brute = ((x[:, None] - x[None]) ** 2).sum(-1) + np.diag(np.full(41, np.inf))
    assert np.allclose(q.knn_sq_dist(x, x, 3, 6, exclude_self=True)[0], np.sort(self_brute, 1)[:, :3], atol=1e-4)


# --- our Inception pipeline is wired to the library's numbers ---


class _Uint8Set(Dataset):
    """What torch-fidelity reads: uint8 CHW tensors."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights (He-initialised so activations neither vanish nor
    explode), saved where `feature_extractor_weights_path` loads it (torch.load + strict load_state_dict)."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3(q.INCEPTION, ["2048"],
                                          feature_extractor_weights_path=str(folder / "empty.pth"))
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / "weights.pth")
    return folder / "weights.pth"


@pytest.mark.slow
def test_our_inception_metrics_equal_torch_fidelitys_own_call(random_inception, cifar_sets):
    """Same weights file, same images: our extraction (uint8 NHWC shards -> map_batches) and metric calls
    give the library's FID, IS, KID and precision/recall."""
    import torch_fidelity

    images, _ = read_imageset(cifar_sets["test"])
    gen, real = images[:24], images[100:124]
    net = q.load_inception(random_inception)
    ours_gen, ours_real = (q.inception_embedding(net, x, 10, "cpu") for x in (gen, real))
    assert ours_gen.features.shape == (24, 2048) and ours_gen.logits.shape == (24, 1008)
    ours = q.set_metrics(ours_gen, ours_real, k=3, block_size=8)
    theirs = torch_fidelity.calculate_metrics(
        input1=_Uint8Set(gen), input2=_Uint8Set(real), cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor=q.INCEPTION, feature_extractor_weights_path=str(random_inception), cache=False,
        verbose=False, save_cpu_ram=True, batch_size=12, isc_splits=10, kid_subset_size=24)
    assert ours["fid"] > 0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-9)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])


def test_missing_inception_weights_name_the_key(tmp_path):
    with pytest.raises(q.WeightsError, match="analysis.inception_weights: .* never downloaded"):
        q.load_inception(tmp_path / "nowhere.pth")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(q.WeightsError, match="not torch-fidelity Inception-v3 weights"):
        q.load_inception(tmp_path / "other.pth")


# --- leakage ---


def _planted(test_x: np.ndarray, rng: np.random.Generator, n: int, copies: dict[int, int], perturbed: dict[int, int],
             train_x: np.ndarray) -> np.ndarray:
    """n images of a per-pixel Gaussian fit of the training set; rows `copies` are exact copies of test
    images, rows `perturbed` test images with +-2/255 noise."""
    mean, std = train_x.astype(np.float32).mean(0), train_x.astype(np.float32).std(0)
    gen = np.clip(np.round(mean + std * rng.standard_normal((n, *mean.shape))), 0, 255).astype(np.uint8)
    for row, j in copies.items():
        gen[row] = test_x[j]
    for row, j in perturbed.items():
        noise = rng.integers(-2, 3, size=test_x[j].shape)
        gen[row] = np.clip(test_x[j].astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return gen


def test_planted_test_copies_are_flagged_exactly_and_a_clean_gaussian_shard_is_not(cifar_sets):
    train_x, _ = read_imageset(cifar_sets["train"])
    test_x, _ = read_imageset(cifar_sets["test"])
    train_x = train_x[:1000]
    torch.manual_seed(0)
    teacher = models.build("small_cnn").eval()
    copies, perturbed = {3: 10, 40: 11, 77: 250}, {12: 99, 55: 400}
    rng = np.random.default_rng(6)
    planted = _planted(test_x, rng, 120, copies, perturbed, train_x)
    clean = _planted(test_x, rng, 120, {}, {}, train_x)
    spaces = lambda x: {"pixels": q.pixel_vectors(x), "features": q.teacher_embedding(teacher, x, 64, "cpu").features}
    test_sp, train_sp = spaces(test_x), spaces(train_x)
    ids = {"generated": np.arange(1000, 1120), "test": np.arange(len(test_x)), "train": np.arange(len(train_x))}
    report, pairs = q.leakage(spaces(planted), test_sp, train_sp, 0.01, ids, block_size=50)
    expected = sorted(1000 + row for row in [*copies, *perturbed])
    for space in ("pixels", "features"):
        leak = report[space]["test"]
        assert sorted(leak["flagged"]) == expected, space
        by_row = dict(zip(leak["flagged"], leak["nearest"]))
        assert {r - 1000: by_row[r] for r in expected} == {**copies, **perturbed}
        assert leak["share"] == pytest.approx(5 / 120)
        assert report[space]["train"]["n_flagged"] == 0   # no copies of train images planted
    # exact copies at distance exactly 0 (no float32 cancellation of ||q||^2 + ||p||^2 - 2 q.p); 55 is noisy
    assert set(np.flatnonzero(pairs["test"][0] == 0)) == set(copies)
    assert pairs["test"][0][55] > 0.05
    clean_report, _ = q.leakage(spaces(clean), test_sp, train_sp, 0.01, ids, block_size=50)
    for space in ("pixels", "features"):
        assert clean_report[space]["test"]["n_flagged"] == 0 and clean_report[space]["train"]["n_flagged"] == 0


def test_calibrated_threshold_is_the_quantile_of_real_to_pool_distances():
    rng = np.random.default_rng(7)
    train, test = rng.standard_normal((200, 3)), rng.standard_normal((100, 3))
    brute = np.sqrt(((test[:, None] - train[None]) ** 2).sum(-1).min(1))
    assert q.calibrated_threshold(test, train, 0.05, 16) == pytest.approx(np.quantile(brute, 0.05), rel=1e-4)


@pytest.mark.parametrize("n_train", [200, 500, 1600])
def test_held_out_real_images_are_flagged_at_the_quantile_whatever_the_pool_sizes(n_train):
    """Real images in neither pool, treated as generated, are flagged at about `quantile` against the test
    pool and the train pool alike, whatever the train pool's size: each pool's threshold is calibrated on
    that pool (a threshold from test -> train distances flagged 3.75% at 200 training images, 0.75% at 1,600)."""
    rng = np.random.default_rng(n_train)
    draw = lambda n: {"x": rng.standard_normal((n, 6)).astype(np.float32)}
    test, train, held_out = draw(500), draw(n_train), draw(6000)
    ids = {"generated": np.arange(6000), "test": np.arange(500), "train": np.arange(n_train)}
    report, _ = q.leakage(held_out, test, train, 0.02, ids, block_size=512)
    for pool in ("test", "train"):
        assert 0.01 <= report["x"][pool]["share"] <= 0.035, (pool, report["x"][pool]["share"])


def test_nearest_distances_of_exact_copies_are_zero():
    """Pixel vectors of 3,072 values near 1: the expansion alone leaves ~1e-4 squared distance for a copy."""
    rng = np.random.default_rng(3)
    pool = q.pixel_vectors(rng.integers(200, 256, (40, 32, 32, 3), dtype=np.uint8))
    distance, row = q.nearest(pool[[5, 17]], pool, block_size=8)
    assert distance.tolist() == [0.0, 0.0] and row.tolist() == [5, 17]


def test_kid_reports_no_spread_when_every_subset_is_the_whole_set():
    rng = np.random.default_rng(4)
    small = q.kernel_distance(rng.standard_normal((300, 8)), rng.standard_normal((300, 8)))
    assert small["kid_std"] is None and np.isfinite(small["kid_mean"])


def test_analysis_uses_inception_when_the_weights_path_is_set(random_inception, tiny_params):
    """analysis.inception_weights set: Inception features (2048-d, 1008 logits), labelled `inception`;
    empty: the teacher's, labelled `teacher`."""
    from pipeline import analysis
    from pipeline import params as P

    cfg = P.section(analysis.AnalysisConfig, {**tiny_params["analysis"], "inception_weights": str(random_inception)})
    space, embed = analysis.embedder(cfg, None, torch.device("cpu"))
    out = embed(np.zeros((2, 32, 32, 3), dtype=np.uint8), "test")
    assert space == "inception" and out.features.shape == (2, 2048) and out.logits.shape == (2, 1008)
    teacher = models.build("small_cnn")
    space, embed = analysis.embedder(P.section(analysis.AnalysisConfig, tiny_params["analysis"]), teacher, "cpu")
    assert space == "teacher" and embed(np.zeros((2, 32, 32, 3), dtype=np.uint8), "x").features.shape == (2, 64)
    assert "not comparable" in q.SPACE_LABELS["teacher"]
