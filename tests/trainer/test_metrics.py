"""OOD metrics: sklearn agreement, both FPR@95 conventions on known answers, ties, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oal_trainer.metrics import (
    AUPR_IN,
    AUPR_OUT,
    AUROC,
    FPR95_ID_POSITIVE,
    FPR95_OOD_POSITIVE,
    OOD_METRIC_KEYS,
    MetricInputError,
    accuracy,
    mean_metrics,
    ood_metrics,
)


def _brute_fpr95_id_positive(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Tightest threshold t (accept as ID when score >= t) keeping >= 95% of ID; OOD accepted."""
    for threshold in np.unique(np.concatenate([id_scores, ood_scores]))[::-1]:
        if (id_scores >= threshold).mean() >= 0.95:
            return float((ood_scores >= threshold).mean())
    raise AssertionError("unreachable: the lowest score keeps all ID")


def _brute_fpr95_ood_positive(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Tightest threshold t (flag as OOD when score <= t) catching >= 95% of OOD; ID flagged."""
    for threshold in np.unique(np.concatenate([id_scores, ood_scores])):
        if (ood_scores <= threshold).mean() >= 0.95:
            return float((id_scores <= threshold).mean())
    raise AssertionError("unreachable: the highest score flags all OOD")


def _check_against_references(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    result = ood_metrics(id_scores, ood_scores)
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    assert result[AUROC] == pytest.approx(roc_auc_score(is_id, scores), abs=1e-12)
    assert result[AUROC] == pytest.approx(roc_auc_score(1 - is_id, -scores), abs=1e-12)  # OOD-positive view
    assert result[AUPR_IN] == pytest.approx(average_precision_score(is_id, scores), abs=1e-12)
    assert result[AUPR_OUT] == pytest.approx(average_precision_score(1 - is_id, -scores), abs=1e-12)
    assert result[FPR95_ID_POSITIVE] == pytest.approx(_brute_fpr95_id_positive(id_scores, ood_scores))
    assert result[FPR95_OOD_POSITIVE] == pytest.approx(_brute_fpr95_ood_positive(id_scores, ood_scores))
    assert set(result) == set(OOD_METRIC_KEYS)
    assert all(0.0 <= value <= 1.0 for value in result.values())
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_references_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    _check_against_references(rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.5, 170))


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_references_on_heavily_tied_scores(seed):
    rng = np.random.default_rng(seed)
    # Six distinct values for 400 scores: every threshold cuts through a tie.
    _check_against_references(rng.integers(1, 7, 250).astype(float), rng.integers(0, 5, 150).astype(float))


def test_both_fpr95_conventions_on_a_hand_made_case():
    id_scores = np.arange(1.0, 21.0)  # 1, 2, ..., 20
    ood_scores = np.r_[np.zeros(17), 3.5, 4.5, 30.0]
    result = ood_metrics(id_scores, ood_scores)
    # Keep 95% of ID (19 of 20): accept score >= 2; OOD accepted: 3.5, 4.5, 30 -> 3 / 20.
    assert result[FPR95_ID_POSITIVE] == pytest.approx(0.15)
    # Catch 95% of OOD (19 of 20): flag score <= 4.5; ID flagged: 1, 2, 3, 4 -> 4 / 20.
    assert result[FPR95_OOD_POSITIVE] == pytest.approx(0.20)


def test_all_tied_scores_give_chance_auroc_and_full_fpr():
    result = ood_metrics(np.full(20, 5.0), np.full(20, 5.0))
    assert result[AUROC] == pytest.approx(0.5)
    # A threshold cannot split a tie: keeping 95% of ID accepts all OOD, and the other way round.
    assert result[FPR95_ID_POSITIVE] == pytest.approx(1.0)
    assert result[FPR95_OOD_POSITIVE] == pytest.approx(1.0)


def test_aupr_in_and_out_differ_on_an_asymmetric_case_and_use_the_right_positive_class():
    rng = np.random.default_rng(5)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 20), rng.normal(0.0, 1.0, 200)
    result = ood_metrics(id_scores, ood_scores)
    scores = np.r_[id_scores, ood_scores]
    is_id = np.r_[np.ones(20), np.zeros(200)]
    assert result[AUPR_IN] == pytest.approx(average_precision_score(is_id, scores))
    assert result[AUPR_OUT] == pytest.approx(average_precision_score(1 - is_id, -scores))
    # 20 ID against 200 OOD: the rare class has the low AUPR. A swap (the reference's bug) would show.
    assert result[AUPR_IN] < 0.6 < result[AUPR_OUT]


def test_perfect_separation_gives_auroc_one_and_zero_fpr():
    result = ood_metrics(np.linspace(10.0, 20.0, 50), np.linspace(-5.0, 5.0, 40))
    assert result[AUROC] == 1.0
    assert result[FPR95_ID_POSITIVE] == 0.0
    assert result[FPR95_OOD_POSITIVE] == 0.0
    assert result[AUPR_IN] == 1.0 and result[AUPR_OUT] == 1.0


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "field"),
    [
        ([], [0.0], "id_scores"),
        ([1.0], [[0.0]], "ood_scores"),
        ([1.0, np.nan], [0.0], "id_scores"),
        ([1.0], [np.inf], "ood_scores"),
    ],
)
def test_bad_scores_are_refused_naming_the_argument(id_scores, ood_scores, field):
    with pytest.raises(MetricInputError, match=field):
        ood_metrics(id_scores, ood_scores)


def test_accuracy_and_mean_metrics():
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == pytest.approx(0.75)
    with pytest.raises(MetricInputError, match="labels"):
        accuracy(np.array([0, 1]), np.array([0, 1, 2]))
    averaged = mean_metrics([{AUROC: 0.9, AUPR_IN: 0.5}, {AUROC: 0.7, AUPR_IN: 0.25}])
    assert averaged == {AUROC: pytest.approx(0.8), AUPR_IN: pytest.approx(0.375)}
    with pytest.raises(MetricInputError, match="per_set"):
        mean_metrics([])
