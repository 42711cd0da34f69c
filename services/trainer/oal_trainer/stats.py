"""Statistics over seeds: a mean with its 95% interval, and paired differences between recipes.

Runs of two recipes that share a seed share the `ce` init and the data order, so their difference
is paired: the seed-to-seed noise common to both cancels. The interval of the mean paired
difference is Student's t (n - 1 degrees of freedom); a percentile bootstrap over seeds and the
Wilcoxon signed-rank test are given beside it as checks that need no normality assumption.
A difference counts as distinguishable from noise when the t interval excludes zero.

Note: with n seeds the exact two-sided Wilcoxon p-value cannot go below 2 / 2**n (0.0625 at n = 5),
so at 5 seeds only the interval can call a difference; the p-value needs 6 or more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1) and the t interval of the mean; NaN where n < 2."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (treatment - baseline) over shared seeds, with its intervals and a signed-rank test."""

    n: int
    mean: float
    std: float
    ci_low: float  # t interval
    ci_high: float
    bootstrap_low: float  # percentile bootstrap over seeds
    bootstrap_high: float
    wilcoxon_p: float  # two-sided, exact for small n; NaN where n < 2, 1.0 when every difference is 0

    @property
    def distinguishable(self) -> bool:
        """The t interval excludes zero."""
        return self.n >= 2 and (self.ci_low > 0 or self.ci_high < 0)


def _as_array(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {array.shape}")
    return array


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student t interval of the mean of `values`: mean -+ t_{(1+c)/2, n-1} * s / sqrt(n)."""
    array = _as_array(values)
    n = array.size
    if n < 2:
        return (math.nan, math.nan)
    mean = float(array.mean())
    sem = float(array.std(ddof=1)) / math.sqrt(n)
    if sem == 0:
        return (mean, mean)
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, df=n - 1)) * sem
    return (mean - half, mean + half)


def summarise(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    array = _as_array(values)
    if array.size == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    low, high = t_interval(array, confidence)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return Summary(int(array.size), float(array.mean()), std, low, high)


def _bootstrap_interval(differences: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    if differences.size < 2 or np.ptp(differences) == 0:
        value = float(differences.mean()) if differences.size else math.nan
        return (value, value) if differences.size >= 2 else (math.nan, math.nan)
    result = scipy_stats.bootstrap(
        (differences,),
        np.mean,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def _wilcoxon_p(differences: np.ndarray) -> float:
    if differences.size < 2:
        return math.nan
    if not np.any(differences):
        return 1.0
    return float(scipy_stats.wilcoxon(differences, alternative="two-sided").pvalue)


def paired_difference(
    treatment: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0
) -> PairedDifference:
    """treatment[i] and baseline[i] come from the same seed; see the module docstring."""
    after, before = _as_array(treatment), _as_array(baseline)
    if after.shape != before.shape:
        raise ValueError(f"paired values need equal lengths, got {after.size} and {before.size}")
    differences = after - before
    summary = summarise(differences, confidence)
    boot_low, boot_high = _bootstrap_interval(differences, confidence, seed)
    return PairedDifference(
        n=summary.n,
        mean=summary.mean,
        std=summary.std,
        ci_low=summary.ci_low,
        ci_high=summary.ci_high,
        bootstrap_low=boot_low,
        bootstrap_high=boot_high,
        wilcoxon_p=_wilcoxon_p(differences),
    )


def seeds_needed(std_of_difference: float, effect: float, confidence: float = CONFIDENCE) -> int | None:
    """Fewest seeds n whose t interval of a paired mean difference of size `effect` excludes zero,
    when the differences scatter with `std_of_difference` (a planning figure, not a power analysis)."""
    if not (std_of_difference > 0) or effect == 0 or math.isnan(effect):
        return None
    for n in range(2, 1000):
        half = float(scipy_stats.t.ppf((1 + confidence) / 2, df=n - 1)) * std_of_difference / math.sqrt(n)
        if half < abs(effect):
            return n
    return None
