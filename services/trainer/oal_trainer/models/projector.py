"""The outlier projector P of oal-energy (docs/METHOD.md, Stage D)."""

from __future__ import annotations

import torch
from torch import nn


class OutlierProjector(nn.Module):
    """P: reduced outlier latent f_ood (B, F) -> a point in the student's feature space (B, D).

    Latent outliers have no pixels, so the student cannot compute their logits; `head(P(f_ood))`
    gives them logits through the student's own classifier (oal-energy). The ReLU matches the
    student's features, which leave a ReLU and an average pool and so are never negative.
    """

    def __init__(self, in_dim: int, feature_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, feature_dim), nn.ReLU())

    def forward(self, f_ood: torch.Tensor) -> torch.Tensor:
        return self.net(f_ood)  # (B, D)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
