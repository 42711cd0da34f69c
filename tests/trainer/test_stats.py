"""Aggregation over seeds against values worked out by hand (t table, exact signed-rank counts)."""

import math

import pytest

from oal_trainer.stats import paired_difference, seeds_needed, summarise, t_interval

T_975_DF4 = 2.7764451051977987  # Student t, 97.5% quantile, 4 degrees of freedom (any t table)


def test_summary_of_five_values():
    summary = summarise([1.0, 2.0, 3.0, 4.0, 5.0])
    assert summary.n == 5
    assert summary.mean == pytest.approx(3.0)
    assert summary.std == pytest.approx(math.sqrt(2.5))  # sum of squares 10 over n - 1 = 4
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # = 1.9633
    assert summary.ci_low == pytest.approx(3.0 - half)
    assert summary.ci_high == pytest.approx(3.0 + half)
    assert summary.half_width == pytest.approx(half)


def test_one_value_has_no_interval():
    summary = summarise([0.7])
    assert summary.mean == 0.7
    assert math.isnan(summary.std) and math.isnan(summary.ci_low) and math.isnan(summary.half_width)


def test_constant_values_have_a_zero_width_interval():
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_paired_difference_cancels_the_shared_seed_noise():
    # The baseline scatters widely over seeds; the treatment is it plus 0.01, 0.02, ..., 0.05.
    baseline = [0.60, 0.80, 0.55, 0.90, 0.70]
    treatment = [b + d for b, d in zip(baseline, [0.01, 0.02, 0.03, 0.04, 0.05], strict=True)]
    difference = paired_difference(treatment, baseline)
    assert difference.n == 5
    assert difference.mean == pytest.approx(0.03)
    half = T_975_DF4 * math.sqrt(0.00025) / math.sqrt(5)  # std of 0.01..0.05 is sqrt(2.5) * 0.01
    assert (difference.ci_low, difference.ci_high) == pytest.approx((0.03 - half, 0.03 + half))
    assert difference.distinguishable
    # All five differences positive: exact two-sided signed-rank p = 2 / 2**5.
    assert difference.wilcoxon_p == pytest.approx(0.0625)
    assert 0.01 <= difference.bootstrap_low <= 0.03 <= difference.bootstrap_high <= 0.05
    # Unpaired, the same numbers overlap completely: the baseline's own interval is wider than the effect.
    assert summarise(baseline).half_width > 0.03


def test_a_difference_that_changes_sign_is_noise():
    difference = paired_difference([0.52, 0.48, 0.51, 0.49], [0.50, 0.50, 0.50, 0.50])
    assert difference.mean == pytest.approx(0.0)
    assert not difference.distinguishable


def test_identical_runs_give_p_one_and_zero_difference():
    difference = paired_difference([0.5, 0.6], [0.5, 0.6])
    assert difference.wilcoxon_p == 1.0 and difference.mean == 0.0 and not difference.distinguishable


def test_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([0.1, 0.2], [0.1])


def test_seeds_needed_grows_as_the_effect_shrinks():
    # std 0.02, effect 0.03: n = 4 gives half-width t(3) * 0.02 / 2 = 0.0318 > 0.03; n = 5 gives 0.0248.
    assert seeds_needed(0.02, 0.03) == 5
    assert seeds_needed(0.02, 0.01) > seeds_needed(0.02, 0.03)
    assert seeds_needed(0.0, 0.01) is None
