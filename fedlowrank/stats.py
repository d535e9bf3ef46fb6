"""Intervals and paired tests for results over seeds (Student's t: a handful of seeds, unknown variance)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f} (n={self.n})"
        return f"{self.mean:.4f} ± {self.high - self.mean:.4f} (n={self.n})"


@dataclass(frozen=True)
class PairedComparison:
    """``a - b`` over paired runs (same seeds, same partitions): the mean difference, its interval and the
    two-sided p-value of the paired t-test (H0: no difference)."""

    difference: Interval
    p_value: float


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean and its two-sided ``confidence`` interval, mean ± t_{(1+c)/2, n-1} · s / √n."""
    if not values:
        raise ValueError("no values to summarize")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_comparison(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Paired t-test of ``a`` against ``b`` (the i-th values come from the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    interval = mean_interval(differences, confidence)
    if len(differences) < 2:
        return PairedComparison(interval, math.nan)
    spread = statistics.stdev(differences)
    if spread == 0:  # identical differences: certain if non-zero, no evidence if zero
        return PairedComparison(interval, 1.0 if interval.mean == 0 else 0.0)
    t = interval.mean / (spread / math.sqrt(len(differences)))
    return PairedComparison(interval, float(2 * stats.t.sf(abs(t), len(differences) - 1)))
