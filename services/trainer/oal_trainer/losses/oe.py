"""Outlier exposure: cross-entropy from the softmax on outliers to the uniform distribution.

Hendrycks et al. 2019, "Deep Anomaly Detection with Outlier Exposure", https://arxiv.org/abs/1812.04606:

    L_OE = mean_i [ -(1/K) sum_c log softmax(z_i)_c ]

Minimal (= log K) when the model is maximally unsure on every outlier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oal_trainer.losses._validation import check_matrix


def outlier_exposure_loss(ood_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution, (B, K) logits -> scalar."""
    check_matrix("ood_logits", ood_logits)
    return -F.log_softmax(ood_logits, dim=1).mean(dim=1).mean()
