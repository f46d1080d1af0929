"""Statistics of a study: intervals over training seeds and paired tests on the same test images.

Two sources of noise, two kinds of test. Across training seeds: the mean accuracy with a Student-t
interval, and the difference to the baseline paired by seed (the runs of one seed share their data draw
and initialisation, so pairing removes that variance). Within one seed, on the same test images: the exact
McNemar test on the discordant examples (McNemar 1947; exact binomial form, as Dietterich 1998
recommends for comparing two classifiers on one test set) and a paired bootstrap interval of the accuracy
difference (Efron and Tibshirani 1993, percentile interval), resampling test images, not seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from scipy import stats

LEVEL = 0.95


class Interval(NamedTuple):
    mean: float
    low: float    # nan with fewer than two values (no spread to estimate)
    high: float
    n: int


class McNemar(NamedTuple):
    n01: int          # wrong under a, right under b
    n10: int          # right under a, wrong under b
    p_value: float    # exact two-sided: binomial(n01 + n10, 1/2); 1 when no example is discordant


def t_interval(values: np.ndarray | list[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t confidence interval (sample standard deviation, n - 1 degrees of freedom)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError(f"t_interval needs a non-empty list of values, got shape {x.shape}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x))


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = LEVEL) -> Interval:
    """t-interval of values[seed] - baseline[seed] over the seeds both have (n = 0: no common seed)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return Interval(math.nan, math.nan, math.nan, 0)
    return t_interval([values[seed] - baseline[seed] for seed in seeds], level)


def _paired(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired tests need per-example results of the same test images, got {a.shape} and {b.shape}")
    return a, b


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact McNemar test of two classifiers' per-example correctness on the same test images."""
    a, b = _paired(correct_a, correct_b)
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    p_value = float(stats.binomtest(n01, n01 + n10, 0.5).pvalue) if n01 + n10 else 1.0
    return McNemar(n01, n10, p_value)


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, seed: int, n_resamples: int = 10_000,
                     level: float = LEVEL) -> Interval:
    """Accuracy of b minus a with a percentile interval from resampling test images (paired: an image's two
    results stay together). Each example contributes -1, 0 or +1, so a resample of n images is a multinomial
    draw over those three values: exact, and cheap at any n."""
    a, b = _paired(correct_a, correct_b)
    n = len(a)
    if not n:
        raise ValueError("paired_bootstrap needs at least one test image")
    d = b.astype(np.int64) - a.astype(np.int64)
    probs = np.array([(d == -1).mean(), (d == 0).mean(), (d == 1).mean()])
    counts = np.random.default_rng(seed).multinomial(n, probs, size=n_resamples)
    diffs = (counts[:, 2] - counts[:, 0]) / n
    low, high = np.quantile(diffs, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(float(d.mean()), float(low), float(high), n)
