"""Known answers and coverage of the study's statistics (pipeline/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import stats


def test_t_interval_by_hand():
    # 1..5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445105 -> half-width 2.776445105 * sqrt(2.5 / 5)
    mean, low, high, n = stats.t_interval([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert (mean, n) == (3.0, 5)
    assert low == pytest.approx(3 - half, abs=1e-8) and high == pytest.approx(3 + half, abs=1e-8)
    # three seeds: t(0.975, 2) = 4.302652730
    mean, low, high, _ = stats.t_interval([0.40, 0.42, 0.47])
    s = np.std([0.40, 0.42, 0.47], ddof=1)
    assert high - mean == pytest.approx(4.302652730 * s / math.sqrt(3), abs=1e-9)


def test_t_interval_of_one_value_has_no_bounds():
    interval = stats.t_interval([0.5])
    assert interval.mean == 0.5 and interval.n == 1 and math.isnan(interval.low) and math.isnan(interval.high)
    with pytest.raises(ValueError, match="non-empty"):
        stats.t_interval([])


def test_paired_difference_pairs_by_seed_not_by_order():
    arm = {0: 0.30, 1: 0.35, 2: 0.32, 7: 0.99}      # seed 7 has no baseline: left out
    base = {2: 0.30, 0: 0.28, 1: 0.33}
    interval = stats.paired_difference(arm, base)
    assert interval.n == 3 and interval.mean == pytest.approx(0.02)
    assert interval.low == pytest.approx(0.02) and interval.high == pytest.approx(0.02)   # the same gain each seed
    # pairing removes seed variance that an unpaired comparison keeps
    arm, base = {0: 0.20, 1: 0.40, 2: 0.30}, {0: 0.19, 1: 0.38, 2: 0.285}
    paired = stats.paired_difference(arm, base)
    assert paired.low > 0
    assert stats.t_interval(list(arm.values())).low < stats.t_interval(list(base.values())).high
    assert stats.paired_difference(arm, {5: 0.1}).n == 0


def test_mcnemar_exact_textbook_value():
    # 10 discordant pairs one way, 2 the other: p = 2 * P(X <= 2 | 12, 1/2) = 2 * 79 / 4096
    a = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    b = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    result = stats.mcnemar(a, b)
    assert (result.n01, result.n10) == (10, 2)
    assert result.p_value == pytest.approx(158 / 4096, rel=1e-12)
    assert stats.mcnemar(b, a).p_value == pytest.approx(result.p_value) and stats.mcnemar(b, a).n01 == 2
    assert stats.mcnemar(a, a) == stats.McNemar(0, 0, 1.0)
    # the pilot's 75 / 36 split (z 3.7) is far below 0.05; 50 / 44 is noise
    pilot = np.r_[np.zeros(75, bool), np.ones(36, bool)], np.r_[np.ones(75, bool), np.zeros(36, bool)]
    assert stats.mcnemar(*pilot).p_value < 0.001
    noise = np.r_[np.zeros(50, bool), np.ones(44, bool)], np.r_[np.ones(50, bool), np.zeros(44, bool)]
    assert stats.mcnemar(*noise).p_value > 0.5


def test_paired_tests_refuse_unpaired_inputs():
    with pytest.raises(ValueError, match="same test images"):
        stats.mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_paired_bootstrap_is_seeded_and_centred():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.4
    b = a | (rng.random(1000) < 0.1)
    one, two = stats.paired_bootstrap(a, b, seed=3), stats.paired_bootstrap(a, b, seed=3)
    assert one == two and one.mean == pytest.approx(b.mean() - a.mean())
    assert one.low < one.mean < one.high and one.low > 0
    # about the normal approximation of a paired difference: 1.96 sd of the mean of d
    d = b.astype(float) - a.astype(float)
    assert one.high - one.low == pytest.approx(2 * 1.96 * d.std() / math.sqrt(len(d)), rel=0.1)


def test_interval_coverage_on_simulated_data():
    """Both intervals hold the true value about 95% of the time (fixed seed; binomial slack of 400 trials)."""
    rng = np.random.default_rng(12345)
    t_hits = sum(_covers(stats.t_interval(rng.normal(0.3, 0.02, 3)), 0.3) for _ in range(400))
    assert 0.91 <= t_hits / 400 <= 0.99
    boot_hits = 0
    for trial in range(400):   # true accuracies 0.40 and 0.45 on 1,000 paired images
        base = rng.random(1000)
        a, b = base < 0.40, base < 0.45
        flip = rng.random(1000) < 0.2   # some examples b gets wrong that a gets right, and back
        b = np.where(flip, rng.random(1000) < 0.45, b)
        boot_hits += _covers(stats.paired_bootstrap(a, b, seed=trial, n_resamples=2000), 0.05)
    assert 0.91 <= boot_hits / 400 <= 0.99


def _covers(interval: stats.Interval, value: float) -> bool:
    return interval.low <= value <= interval.high
