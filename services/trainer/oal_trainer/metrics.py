"""OOD-detection metrics with their conventions spelled out, and classification accuracy.

Every score here is "higher = more in-distribution" (energy, MSP, max-logit all are). Papers mix
the conventions below, so each metric key names its own and `METRIC_CONVENTIONS` states them in
words that go into every metrics file and table:

- AUROC: ID as the positive class, score as is. Identical to OOD-positive on the negated score.
- AUPR-In: ID positive, score as is. AUPR-Out: OOD positive, negated score. Both are sklearn's
  average precision (step-wise, no interpolation). OpenOOD integrates the PR curve with the
  trapezoid rule instead, which reads slightly higher; the reference code also swaps In and Out.
- FPR@95, OpenOOD v1.5 (`fpr95_ood_positive`): OOD is positive; at the loosest threshold that
  catches at least 95% of OOD, the fraction of ID inputs flagged as OOD.
- FPR@95, Hendrycks / Dream-OOD (`fpr95_id_positive`): at the threshold that keeps at least 95%
  of ID, the fraction of OOD inputs accepted as ID. (Hendrycks' code takes the recall nearest
  to 95%, which may be just below it; we never go below.)

Ties are exact: a threshold accepts all scores equal to it, through sklearn's `roc_curve` with no
point dropped. All values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oal_shared.errors import OALError

AUROC = "auroc"
FPR95_OOD_POSITIVE = "fpr95_ood_positive"
FPR95_ID_POSITIVE = "fpr95_id_positive"
AUPR_IN = "aupr_in"
AUPR_OUT = "aupr_out"
OOD_METRIC_KEYS: tuple[str, ...] = (AUROC, FPR95_OOD_POSITIVE, FPR95_ID_POSITIVE, AUPR_IN, AUPR_OUT)
HIGHER_IS_BETTER: dict[str, bool] = {
    AUROC: True,
    FPR95_OOD_POSITIVE: False,
    FPR95_ID_POSITIVE: False,
    AUPR_IN: True,
    AUPR_OUT: True,
}
RECALL_LEVEL = 0.95  # the "95" of FPR@95

METRIC_CONVENTIONS: dict[str, str] = {
    "score": "higher score = more in-distribution (ID)",
    AUROC: "area under ROC, ID positive (same value as OOD positive on the negated score)",
    FPR95_OOD_POSITIVE: (
        "OpenOOD v1.5: OOD positive; fraction of ID flagged as OOD at the threshold catching >= 95% of OOD"
    ),
    FPR95_ID_POSITIVE: (
        "Hendrycks / Dream-OOD: fraction of OOD accepted as ID at the threshold keeping >= 95% of ID"
    ),
    AUPR_IN: "average precision with ID positive, score as is",
    AUPR_OUT: "average precision with OOD positive, negated score",
    "units": "fractions in [0, 1]",
}


class MetricInputError(OALError, ValueError):
    """Scores or labels that no metric can be computed on; the message names the argument."""


def _as_scores(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise MetricInputError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise MetricInputError(f"{name} holds {bad} non-finite value(s) (NaN or inf)")
    return array


def _fpr_at_recall(is_positive: np.ndarray, positive_score: np.ndarray, recall: float) -> float:
    """FPR at the loosest threshold whose TPR is >= `recall`; `positive_score` high = positive."""
    fpr, tpr, _ = roc_curve(is_positive, positive_score, drop_intermediate=False)
    # tpr is non-decreasing, so the first index reaching `recall` is the highest such threshold.
    return float(fpr[np.argmax(tpr >= recall)])


def ood_metrics(
    id_scores: Sequence[float] | np.ndarray, ood_scores: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """AUROC, both FPR@95 conventions, AUPR-In and AUPR-Out; scores higher = more ID (see module doc).

    Returns fractions in [0, 1] under the keys `OOD_METRIC_KEYS`.
    """
    id_array = _as_scores("id_scores", id_scores)  # (N_id,)
    ood_array = _as_scores("ood_scores", ood_scores)  # (N_ood,)
    scores = np.concatenate([id_array, ood_array])
    is_id = np.concatenate([np.ones(id_array.size, dtype=np.int64), np.zeros(ood_array.size, dtype=np.int64)])
    is_ood = 1 - is_id
    return {
        AUROC: float(roc_auc_score(is_id, scores)),
        FPR95_OOD_POSITIVE: _fpr_at_recall(is_ood, -scores, RECALL_LEVEL),
        FPR95_ID_POSITIVE: _fpr_at_recall(is_id, scores, RECALL_LEVEL),
        AUPR_IN: float(average_precision_score(is_id, scores)),
        AUPR_OUT: float(average_precision_score(is_ood, -scores)),
    }


def mean_metrics(per_set: Sequence[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over sets (how OpenOOD forms its near/far rows)."""
    if not per_set:
        raise MetricInputError("per_set must hold at least one set's metrics to average")
    return {key: float(np.mean([metrics[key] for metrics in per_set])) for key in per_set[0]}


def accuracy(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to their label, in [0, 1]."""
    pred_array = np.asarray(preds)
    label_array = np.asarray(labels)
    if pred_array.ndim != 1 or pred_array.size == 0:
        raise MetricInputError(f"preds must be a non-empty 1-D array, got shape {pred_array.shape}")
    if label_array.shape != pred_array.shape:
        raise MetricInputError(f"labels has shape {label_array.shape} but preds has {pred_array.shape}")
    return float((pred_array == label_array).mean())
