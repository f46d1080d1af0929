"""Measures of a generated set against real images: exact nearest neighbours in blocks, FID / IS / KID /
precision-recall, density-coverage, per-class FID and test-set leakage.

Feature spaces. The standard protocol is Inception-v3 pool3 (2048-d) with the 2015 TensorFlow weights
(TTUR's FID, used by Gowal et al. 2021 and successors), through torch-fidelity's `inception-v3-compat`
extractor, whose weights come only from a local file (`analysis.inception_weights`; never downloaded).
Without that file every number is computed in the teacher's feature space (its penultimate layer, raw;
its logits for the Inception Score) and labelled `teacher`: a teacher FID is not comparable with a
published FID, only between rows of the same run.

The metrics themselves are torch-fidelity 0.4.0's (metric_fid, metric_isc, metric_kid, metric_prc), called
on the features we extract, so both feature spaces share one metric code. Density and coverage (Naeem et
al. 2020) are not in torch-fidelity: they are computed here with the same k as precision/recall, on the
blocked exact search below (the only copy of it; the complementarity analysis uses it too).

Leakage: for each generated image, its nearest test (and train) image in pixel L2 ([0, 1] pixels) and in
the feature space; it is flagged when closer than a threshold calibrated on real images against the
same pool: for the test pool, the `leakage_quantile` quantile of the distances from each real training
image to its nearest test image; for the train pool, from each test image to its nearest training image.
Nearest-neighbour distances shrink as a pool grows, so a threshold calibrated on a pool of another size
would flag held-out real images far more or far less often than the quantile says; calibrated on the
pool itself, a real image not in it is flagged with probability about `leakage_quantile`. CIFAR-10's own
train/test near-duplicates (Barz & Denzler 2020 found them for 3.3% of the test images) make up that
low tail, so a flagged image is as close to a pool image as the closest real near-duplicate pairs are.
The nearest neighbours are found with the fast ||q||^2 + ||p||^2 - 2 q.p expansion, then (for leakage)
their distances are recomputed as ||q - p||^2, so an exact copy is at distance 0 (the expansion's
float32 cancellation leaves about 0.01 in pixel space).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch_fidelity import metric_fid, metric_isc, metric_kid, metric_prc  # type: ignore[import-untyped]
from torch_fidelity.utils import create_feature_extractor  # type: ignore[import-untyped]
from tqdm import tqdm

from pipeline.inference import map_batches

QualitySpace = Literal["inception", "teacher"]
INCEPTION = "inception-v3-compat"   # torch-fidelity's name of the 2015 TF Inception-v3 port
INCEPTION_LAYERS = ["2048", "logits_unbiased"]   # pool3 (FID, KID, PR) and logits (IS), the library's defaults
SPACE_LABELS = {
    "inception": "Inception-v3 pool3, 2015 TF weights (torch-fidelity inception-v3-compat)",
    "teacher": "teacher features (penultimate layer of the teacher; not comparable with published FID)",
}
LIBRARY_SEED = 2020   # torch-fidelity's default rng_seed (IS split shuffle, KID subsets)
IS_SPLITS = 10        # the Inception Score protocol (Salimans et al. 2016; torch-fidelity's default)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000   # torch-fidelity's defaults (subset size capped at n)


class WeightsError(RuntimeError):
    """The Inception weights file is missing or not Inception-v3 weights; the message names the key."""


# --- exact nearest neighbours in blocks ---------------------------------------------------------------


def float_tensor(values: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """float32 on `device` (no copy when it already is)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(values), dtype=torch.float32, device=device)


def sq_dist_blocks(queries: np.ndarray | torch.Tensor, pool: np.ndarray | torch.Tensor, block_size: int,
                   device: torch.device | str = "cpu",
                   desc: str | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first query row, squared L2 distances of `block_size` queries to the whole pool) on `device`.

    Memory is block_size x len(pool) floats; ||q||^2 + ||p||^2 - 2 q.p, clamped at 0.
    """
    q_all, p = float_tensor(queries, device), float_tensor(pool, device)
    p_sq = p.pow(2).sum(1)
    for start in tqdm(range(0, len(q_all), block_size), desc=desc, disable=desc is None, leave=False,
                      unit="block"):
        q = q_all[start:start + block_size]
        yield start, (q.pow(2).sum(1, keepdim=True) + p_sq.unsqueeze(0) - 2.0 * (q @ p.T)).clamp_min_(0)


def knn_sq_dist(queries: np.ndarray, pool: np.ndarray, k: int, block_size: int, exclude_self: bool = False,
                device: torch.device | str = "cpu", desc: str | None = None,
                exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest squared L2 distances from each query to the pool, ascending, and their pool indices.

    With `exact`, the neighbours' distances are recomputed as ||q - p||^2 (a copy at exactly 0); without,
    they are the expansion's, comparable with sq_dist_blocks' (density and coverage compare the two).

    With `exclude_self`, queries and pool are the same set and each row skips itself. Missing neighbours
    (pool smaller than k) are inf with index -1.
    """
    if exclude_self and len(queries) != len(pool):
        raise ValueError("exclude_self needs the pool to be the query set itself")
    n = len(queries)
    values = np.full((n, k), np.inf, dtype=np.float32)
    index = np.full((n, k), -1, dtype=np.int64)
    available = len(pool) - (1 if exclude_self else 0)
    if n == 0 or available <= 0:
        return values, index
    take = min(k, available)
    q_all, p = float_tensor(queries, device), float_tensor(pool, device)
    for start, d in sq_dist_blocks(q_all, p, block_size, device, desc):
        if exclude_self:
            rows = torch.arange(len(d), device=d.device)
            d[rows, rows + start] = float("inf")
        found, best = torch.topk(d, take, dim=1, largest=False)   # sorted ascending
        if exact:  # the neighbours' distances again, as differences: copies at 0, no cancellation
            found, order = (q_all[start:start + len(d)].unsqueeze(1) - p[best]).pow_(2).sum(2).sort(dim=1)
            best = best.gather(1, order)
        values[start:start + len(d), :take] = found.cpu().numpy()
        index[start:start + len(d), :take] = best.cpu().numpy()
    return values, index


def min_sq_dist(queries: np.ndarray, pool: np.ndarray, block_size: int, exclude_self: bool = False,
                device: torch.device | str = "cpu", desc: str | None = None, exact: bool = False) -> np.ndarray:
    """Smallest squared L2 distance from each query to the pool, exact (inf when the pool is empty)."""
    return knn_sq_dist(queries, pool, 1, block_size, exclude_self, device, desc, exact)[0][:, 0]


def complementarity_coverage(train: np.ndarray, test: np.ndarray, generated: np.ndarray, block_size: int,
                             device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """The paper's complementarity shares and coverage from feature matrices (rows = samples)."""
    desc = (lambda name: name) if progress else (lambda name: None)
    d_gen = np.stack([min_sq_dist(generated, train, block_size, device=device, desc=desc("gen->train")),
                      min_sq_dist(generated, test, block_size, device=device, desc=desc("gen->test")),
                      min_sq_dist(generated, generated, block_size, True, device, desc("gen->gen"))], axis=1)
    winner = np.argmin(d_gen, axis=1)  # first minimum: ties go to train, then test, then self
    shares = np.bincount(winner, minlength=3) / max(1, len(generated))
    coverage = {}
    for name, real in (("train", train), ("test", test)):
        d_real = min_sq_dist(real, real, block_size, True, device, desc(f"{name}->{name}"))
        d_new = min_sq_dist(real, generated, block_size, device=device, desc=desc(f"{name}->gen"))
        coverage[name] = float((d_new < d_real).mean()) if len(real) else 0.0  # strict: ties go to real
    return {"complementarity": {"train": float(shares[0]), "test": float(shares[1]), "self": float(shares[2])},
            "coverage": coverage}


# --- feature extraction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedding:
    """Features (FID, KID, PR, density-coverage, leakage) and logits (IS) of one image set, float32."""
    features: np.ndarray
    logits: np.ndarray

    def subset(self, rows: np.ndarray) -> Embedding:
        return Embedding(self.features[rows], self.logits[rows])


def load_inception(path: Path, device: torch.device | str = "cpu") -> nn.Module:
    """torch-fidelity's Inception-v3 (2015 TF weights) from a local file; WeightsError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"analysis.inception_weights: {path} not found (Inception weights are never "
                           "downloaded; copy torch-fidelity's weights-inception-2015-12-05-6726825d.pth there, "
                           "or set it to \"\" for teacher features)")
    try:   # the library loads the file with torch.load and a strict load_state_dict
        net = create_feature_extractor(INCEPTION, INCEPTION_LAYERS, cuda=False, verbose=False,
                                       feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError, ValueError, OSError) as error:
        raise WeightsError(f"analysis.inception_weights: {path} is not torch-fidelity Inception-v3 weights "
                           f"({str(error).splitlines()[0]})") from None
    return net.to(device)


def inception_embedding(net: nn.Module, images: np.ndarray, batch_size: int, device: torch.device | str,
                        desc: str | None = None) -> Embedding:
    """pool3 features and unbiased logits. The library takes uint8 NCHW and resizes to 299 itself (TF1
    bilinear), so [0, 1] model inputs go back to uint8 (exact for uint8 images; blends are rounded)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(net(x.mul(255).round_().to(torch.uint8)), dim=1)
    both = map_batches(fn, net, images, batch_size, device, desc)
    return Embedding(both[:, :2048], both[:, 2048:])


def teacher_embedding(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device | str,
                      desc: str | None = None) -> Embedding:
    """The teacher's raw penultimate features and its logits (model.head of those features)."""
    dim = model.head.in_features   # type: ignore[union-attr]

    def fn(x: torch.Tensor) -> torch.Tensor:
        features = model.features(x)   # type: ignore[operator]
        return torch.cat([features, model.head(features)], dim=1)   # type: ignore[operator]
    both = map_batches(fn, model, images, batch_size, device, desc)
    return Embedding(both[:, :dim], both[:, dim:])


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Flattened pixels in [0, 1] (uint8 / 255; float blends as they are), float32, not normalised."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    return flat / 255.0 if np.asarray(images).dtype == np.uint8 else flat


# --- the metrics (torch-fidelity's, on our features) --------------------------------------------------


def fid_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    tensor = torch.from_numpy(np.ascontiguousarray(features))
    stats: dict[str, np.ndarray] = metric_fid.fid_features_to_statistics(tensor)
    return stats


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (TTUR's formula, torch-fidelity's code)."""
    return float(metric_fid.fid_statistics_to_metric(stats_1, stats_2, verbose=False)[metric_fid.KEY_METRIC_FID])


def fid(features_1: np.ndarray, features_2: np.ndarray) -> float | None:
    """FID between two feature sets; None when either has fewer than 2 rows (no covariance)."""
    if len(features_1) < 2 or len(features_2) < 2:
        return None
    return frechet_distance(fid_statistics(features_1), fid_statistics(features_2))


def inception_score(logits: np.ndarray) -> dict[str, float]:
    out = metric_isc.isc_features_to_metric(torch.from_numpy(np.ascontiguousarray(logits)),
                                            splits=min(IS_SPLITS, len(logits)), shuffle=True, rng_seed=LIBRARY_SEED)
    return {"is_mean": out[metric_isc.KEY_METRIC_ISC_MEAN], "is_std": out[metric_isc.KEY_METRIC_ISC_STD]}


def kernel_distance(features_1: np.ndarray, features_2: np.ndarray) -> dict[str, float | None]:
    """KID (Binkowski et al. 2018): cubic polynomial kernel MMD^2 over 100 subsets of min(1000, n).

    `kid_std` is the spread over the subsets; it is None when a subset is a whole set (below 1,000
    images), since every subset then holds the same images of that set and the spread (about 0 when both
    sets are that small) says nothing about the estimate's uncertainty."""
    size = min(KID_SUBSET_SIZE, len(features_1), len(features_2))
    out = metric_kid.kid_features_to_metric(
        torch.from_numpy(features_1), torch.from_numpy(features_2), kid_subsets=KID_SUBSETS,
        kid_subset_size=size, rng_seed=LIBRARY_SEED, verbose=False)
    whole = size in (len(features_1), len(features_2))
    return {"kid_mean": out[metric_kid.KEY_METRIC_KID_MEAN],
            "kid_std": None if whole else out[metric_kid.KEY_METRIC_KID_STD]}


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int, block_size: int,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): torch-fidelity's, in its blocked mode
    (save_cpu_ram: `block_size` rows x the other set per distance block)."""
    out = metric_prc.prc_features_to_metric(torch.as_tensor(generated, device=device),
                                            torch.as_tensor(real, device=device), prc_neighborhood=k,
                                            prc_batch_size=block_size, save_cpu_ram=True, verbose=False)
    return {"precision": float(out[metric_prc.KEY_METRIC_PRECISION]),
            "recall": float(out[metric_prc.KEY_METRIC_RECALL])}


def density_coverage(generated: np.ndarray, real: np.ndarray, k: int, block_size: int,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) with real k-NN balls (radius: k-th neighbour, self excluded).

    density = mean over generated of (number of real balls containing it) / k;
    coverage = share of real samples whose ball contains at least one generated sample.
    """
    radius = knn_sq_dist(real, real, k, block_size, exclude_self=True, device=device)[0][:, k - 1]
    r = torch.as_tensor(radius, device=device)
    inside_count = 0.0
    covered = torch.zeros(len(real), dtype=torch.bool, device=device)
    for _, d in sq_dist_blocks(generated, real, block_size, device):
        inside = d <= r.unsqueeze(0)
        inside_count += float(inside.sum())
        covered |= inside.any(dim=0)
    return {"density": inside_count / (k * max(1, len(generated))),
            "coverage": float(covered.float().mean()) if len(real) else 0.0}


def set_metrics(generated: Embedding, real: Embedding, k: int, block_size: int,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every distribution metric of one set against the real reference sample, in one feature space."""
    out: dict[str, Any] = {"n": len(generated.features), "n_real": len(real.features),
                           "fid": fid(generated.features, real.features)}
    out.update(inception_score(generated.logits))
    out.update(kernel_distance(generated.features, real.features))
    out.update(precision_recall(generated.features, real.features, k, block_size, device))
    out.update(density_coverage(generated.features, real.features, k, block_size, device))
    return out


def per_class_fid(generated: np.ndarray, generated_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                  num_classes: int) -> dict[str, list[Any]]:
    """FID of each class c: generated rows labelled c against real rows of class c (None below 2 rows)."""
    return {"fid": [fid(generated[generated_labels == c], real[real_labels == c]) for c in range(num_classes)],
            "n_generated": [int((generated_labels == c).sum()) for c in range(num_classes)],
            "n_real": [int((real_labels == c).sum()) for c in range(num_classes)]}


# --- leakage and memorisation -----------------------------------------------------------------------


def calibrated_threshold(real: np.ndarray, pool: np.ndarray, quantile: float, block_size: int,
                         device: torch.device | str = "cpu") -> float:
    """The `quantile` quantile of the L2 distances from real images not in `pool` to their nearest `pool`
    image: the near-duplicate scale for generated images compared with that same pool."""
    distances = np.sqrt(min_sq_dist(real, pool, block_size, device=device, exact=True))
    return float(np.quantile(distances, quantile))


def nearest(queries: np.ndarray, pool: np.ndarray, block_size: int,
            device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(L2 distance, pool index) of each query's nearest pool row."""
    values, index = knn_sq_dist(queries, pool, 1, block_size, device=device, exact=True)
    return np.sqrt(values[:, 0]), index[:, 0]


def flagged(distance: np.ndarray, neighbour: np.ndarray, threshold: float, ids: np.ndarray,
            max_listed: int = 1000) -> dict[str, Any]:
    """Rows strictly closer than the threshold: their share, and (closest first) their ids and neighbours."""
    hit = np.flatnonzero(distance < threshold)
    order = hit[np.argsort(distance[hit], kind="stable")][:max_listed]
    return {"threshold": threshold, "share": float(len(hit) / max(1, len(distance))), "n_flagged": int(len(hit)),
            "flagged": [int(i) for i in ids[order]], "nearest": [int(j) for j in neighbour[order]],
            "distance": [round(float(d), 6) for d in distance[order]], "listed_all": bool(len(hit) <= max_listed),
            "median_distance": float(np.median(distance)) if len(distance) else None}


Pairs = dict[str, tuple[np.ndarray, np.ndarray]]   # pool name -> (L2 distance, pool row) of each generated row


def leakage(generated: dict[str, np.ndarray], test: dict[str, np.ndarray], train: dict[str, np.ndarray],
            quantile: float, ids: dict[str, np.ndarray], block_size: int,
            device: torch.device | str = "cpu") -> tuple[dict[str, Any], Pairs]:
    """Per space (e.g. pixels, features): generated images closer to a test image (leakage) or a train
    image (memorisation) than the calibrated threshold. `ids` maps generated/test/train to the ids reported
    for their rows. Also returns the pixel-space nearest pairs (for the figure of the closest ones)."""
    report: dict[str, Any] = {"quantile": quantile}
    pairs: Pairs = {}
    for space in generated:
        entry: dict[str, Any] = {}
        for name, pool, real in (("test", test[space], train[space]), ("train", train[space], test[space])):
            threshold = calibrated_threshold(real, pool, quantile, block_size, device)   # on this very pool
            distance, row = nearest(generated[space], pool, block_size, device)
            entry[name] = flagged(distance, ids[name][row], threshold, ids["generated"])
            if space == "pixels":
                pairs[name] = (distance, row)
        report[space] = entry
    return report, pairs
