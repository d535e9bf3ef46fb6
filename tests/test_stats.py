"""Intervals and paired tests on numbers with known answers."""

from __future__ import annotations

import math
import random

import pytest

from fedlowrank.stats import mean_interval, paired_comparison

T_975_4 = 2.7764451051977987  # Student's t, 97.5 % quantile, 4 degrees of freedom (tables)


def test_interval_of_one_to_five():
    interval = mean_interval([1, 2, 3, 4, 5])
    half = T_975_4 * math.sqrt(2.5) / math.sqrt(5)
    assert (interval.mean, interval.n) == (3, 5)
    assert interval.low == pytest.approx(3 - half, rel=1e-12) and interval.high == pytest.approx(3 + half, rel=1e-12)
    assert str(interval) == f"3.0000 ± {half:.4f} (n=5)"
    assert math.isnan(mean_interval([0.7]).low)
    with pytest.raises(ValueError):
        mean_interval([])


def test_interval_covers_the_true_mean_at_its_level():
    rng, trials, covered = random.Random(0), 2000, 0
    for _ in range(trials):
        interval = mean_interval([rng.gauss(10.0, 2.0) for _ in range(5)])
        covered += interval.low <= 10.0 <= interval.high
    # 95 % nominal; the binomial sd over 2000 trials is 0.5 %
    assert 0.93 < covered / trials < 0.97


def test_paired_test_against_hand_computed_values():
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.78, 0.81, 0.75, 0.83, 0.80]
    d = [x - y for x, y in zip(a, b, strict=True)]  # 0.02 0.01 0.04 0.02 0.01: mean 0.02, sd √(0.00015)
    result = paired_comparison(a, b)
    t = 0.02 / (math.sqrt(0.00015) / math.sqrt(5))
    assert result.difference.mean == pytest.approx(0.02, rel=1e-9)
    assert result.difference.high - 0.02 == pytest.approx(T_975_4 * math.sqrt(0.00015 / 5), rel=1e-9)
    assert t == pytest.approx(3.6514837167011076, rel=1e-12)
    assert result.p_value == pytest.approx(0.0217, abs=5e-4)  # two-sided, 4 df, from t tables
    assert 0.0 < result.p_value < 0.05 and result.difference.low > 0  # the interval excludes 0 iff p < 0.05
    assert sum(d) / 5 == pytest.approx(0.02)


def test_paired_test_edge_cases():
    assert paired_comparison([1, 2, 3], [1, 2, 3]).p_value == 1.0
    assert paired_comparison([2, 3, 4], [1, 2, 3]).p_value == 0.0
    no_effect = paired_comparison([0.5, 0.6, 0.4, 0.55], [0.6, 0.5, 0.45, 0.5])
    assert no_effect.p_value > 0.5 and no_effect.difference.low < 0 < no_effect.difference.high
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1, 2], [1])
