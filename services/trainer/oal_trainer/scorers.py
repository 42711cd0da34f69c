"""Post-hoc OOD scores from a classifier's outputs: a small interface and a registry by name.

A scorer maps one batch's logits (B, K) and penultimate features (B, D) to one score per input,
higher = more in-distribution. Built-ins use the logits only; the features are there for scorers
that need them.

Scorers that need more than one batch's outputs are `ModelScorer`s: `bind(context)` gets the model
being evaluated and, for those with `needs_fit`, the features of the ID training images (never test
data), and returns a plain `Scorer` or an `InputScorer` (which scores the model inputs themselves,
e.g. ODIN's input perturbation). The detectors of pytorch-ood (ViM, KNN, Mahalanobis, ReAct, ASH,
DICE, ODIN) are registered this way by `oal_trainer.detectors`, imported on first use when the
`detectors` extra is installed.

    register_scorer(MyScorer())       # then evaluate_model(..., scorers=("energy", "my-name"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from oal_shared.errors import ConfigError
from oal_trainer.losses.energy import energy_score

DEFAULT_SCORER = "energy"
# Registered by oal_trainer.detectors (pytorch-ood), imported the first time one of these is asked for.
DETECTOR_SCORERS = ("vim", "knn", "mahalanobis", "react", "ash", "dice", "odin")
DETECTORS_EXTRA_HINT = "pip install 'oal-ood[detectors]'"


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


@runtime_checkable
class InputScorer(Protocol):
    """A scorer bound to a model that needs the model's inputs (B, C, H, W), e.g. for input gradients."""

    name: str

    def score_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised inputs (B, C, H, W) -> (B,) scores, higher = more ID. Runs with autograd on."""


@dataclass(frozen=True, eq=False)
class IDFeatures:
    """The model's outputs on the ID training images (un-augmented), row-aligned; what detectors fit on."""

    logits: torch.Tensor  # (N, K) float32, CPU
    features: torch.Tensor  # (N, D) float32, CPU
    labels: torch.Tensor  # (N,) int64, CPU


@dataclass(frozen=True, eq=False)
class ScorerContext:
    """What `ModelScorer.bind` may use: the model in eval mode, its device, the input scaling, the ID fit set."""

    model: nn.Module
    device: torch.device
    input_std: tuple[float, ...]  # per-channel std the inputs were divided by (ODIN steps in pixel units)
    id_train: Callable[[], IDFeatures] | None = None  # computed (or read from the run's cache) on first call

    def id_features(self, scorer: str) -> IDFeatures:
        if self.id_train is None:
            raise ConfigError(f"scorer {scorer!r} is fitted on the ID training set, and none was given")
        return self.id_train()


@runtime_checkable
class ModelScorer(Protocol):
    """A scorer built per evaluated model: `bind` fits it (on ID training features if `needs_fit`)."""

    name: str
    needs_fit: bool

    def bind(self, context: ScorerContext) -> Scorer | InputScorer:
        """The scorer for this model, with any fitting done."""


SCORERS: dict[str, Scorer | ModelScorer] = {}


def register_scorer(scorer: Scorer | ModelScorer, *, replace: bool = False) -> Scorer | ModelScorer:
    """Add `scorer` under `scorer.name`; refuses to shadow an existing name unless `replace`."""
    name = getattr(scorer, "name", None)
    usable = callable(scorer) or callable(getattr(scorer, "bind", None))
    if not isinstance(name, str) or not name or not usable:
        raise ConfigError(
            f"a scorer must be callable (or have a `bind` method) and a non-empty str `name`, got {scorer!r}"
        )
    if name in SCORERS and not replace:
        raise ConfigError(f"scorer name {name!r} is taken; pass replace=True to override it")
    SCORERS[name] = scorer
    return scorer


def _load_detectors(name: str) -> None:
    """Import oal_trainer.detectors (it registers pytorch-ood's detectors), or say how to install them."""
    try:
        import oal_trainer.detectors  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"scorer {name!r} comes from pytorch-ood, which is not installed ({exc}); {DETECTORS_EXTRA_HINT}"
        ) from exc


def get_scorer(name: str) -> Scorer | ModelScorer:
    if name not in SCORERS and name in DETECTOR_SCORERS:
        _load_detectors(name)
    try:
        return SCORERS[name]
    except KeyError:
        known = sorted({*SCORERS, *DETECTOR_SCORERS})
        raise ConfigError(f"unknown scorer {name!r}; known scorers: {', '.join(known)}") from None


def needs_fit(names: Sequence[str]) -> bool:
    """Whether any of the named scorers is fitted on the ID training set."""
    return any(getattr(get_scorer(name), "needs_fit", False) for name in names)


def bind_scorer(name: str, context: ScorerContext) -> Scorer | InputScorer:
    """The scorer `name` ready to score batches of this context's model."""
    scorer = get_scorer(name)
    return scorer.bind(context) if callable(getattr(scorer, "bind", None)) else scorer


for _builtin in (EnergyScorer(), MSPScorer(), MaxLogitScorer()):
    register_scorer(_builtin)
