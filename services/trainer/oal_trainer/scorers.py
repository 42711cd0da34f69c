"""Post-hoc OOD scores from a classifier's outputs: a small interface and a registry by name.

A scorer maps one batch's logits (B, K) and penultimate features (B, D) to one score per input,
higher = more in-distribution. Built-ins use the logits only; the features are there for scorers
that need them (a k-NN or Mahalanobis scorer can be registered the same way).

    register_scorer(MyScorer())       # then evaluate_model(..., scorers=("energy", "my-name"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from oal_shared.errors import ConfigError
from oal_trainer.losses.energy import energy_score

DEFAULT_SCORER = "energy"


@runtime_checkable
class Scorer(Protocol):
    name: str

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """(B, K) logits, (B, D) features or None -> (B,) scores, higher = more ID."""


@dataclass(frozen=True)
class EnergyScorer:
    """Negative free energy T * logsumexp(z / T) (Liu et al. 2020); T = 1 by default (docs/METHOD.md, Stage E)."""

    name: str = "energy"
    temperature: float = 1.0

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return energy_score(logits, T=self.temperature)


@dataclass(frozen=True)
class MSPScorer:
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""

    name: str = "msp"

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return torch.softmax(logits, dim=1).amax(dim=1)


@dataclass(frozen=True)
class MaxLogitScorer:
    """Largest logit (Hendrycks et al. 2022, "Scaling OOD detection")."""

    name: str = "max_logit"

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return logits.amax(dim=1)


SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer, *, replace: bool = False) -> Scorer:
    """Add `scorer` under `scorer.name`; refuses to shadow an existing name unless `replace`."""
    name = getattr(scorer, "name", None)
    if not isinstance(name, str) or not name or not callable(scorer):
        raise ConfigError(f"a scorer must be callable and have a non-empty str `name`, got {scorer!r}")
    if name in SCORERS and not replace:
        raise ConfigError(f"scorer name {name!r} is taken; pass replace=True to override it")
    SCORERS[name] = scorer
    return scorer


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise ConfigError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}") from None


for _builtin in (EnergyScorer(), MSPScorer(), MaxLogitScorer()):
    register_scorer(_builtin)
