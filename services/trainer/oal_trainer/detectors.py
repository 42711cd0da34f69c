"""pytorch-ood's post-hoc detectors behind our scorer registry (the `detectors` extra).

Each adapter is a `ModelScorer`: `bind` takes the evaluated model, fits the detector on the model's
features of the ID training images where the method needs it (never on test data), and returns a
scorer of our convention, higher = more ID. pytorch-ood scores outlierness (higher = more OOD), so
every adapter negates its output.

How our models are fitted to pytorch-ood's interfaces: our models expose only
`forward(x, return_feature=True) -> (logits, h)` and the final linear layer `model.head`, with
h = the pooled penultimate features (B, D). No hooks are needed:
- ViM, KNN, Mahalanobis and DICE are pytorch-ood `FeaturesDetector`s: fitted with `fit_features` on
  h of the ID training set, scoring with `predict_features(h)`; ViM and DICE take `head.weight/bias`.
- ReAct and ASH are `FeatureMapsDetector`s: h is given to them as (B, D, 1, 1) maps, i.e. they act
  on the penultimate layer after pooling, where the ReAct paper clips and where the ASH reference
  code shapes ResNet activations; their head is `model.head` on the flattened map.
- ODIN needs input gradients: `odin` binds an `InputScorer` that hands pytorch-ood the model itself
  (its plain `forward(x)` returns logits), with the benchmark's std so the step eps is in pixel units.

Defaults follow OpenOOD v1.5's CIFAR settings; another setting is one more registered instance,
e.g. `register_scorer(KNNScorer(name="knn-k10", k=10))`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from pytorch_ood.detector import ASH, DICE, KNN, ODIN, EnergyBased, Mahalanobis, ReAct, ViM
from torch import nn

from oal_shared.errors import ConfigError
from oal_trainer.scorers import SCORERS, IDFeatures, ScorerContext, register_scorer

__all__ = [
    "ASHScorer",
    "DICEScorer",
    "KNNScorer",
    "MahalanobisScorer",
    "ODINScorer",
    "ReActScorer",
    "ViMScorer",
]


def _cpu_head(model: nn.Module, scorer: str) -> nn.Linear:
    """A CPU copy of the model's final linear layer; features are scored on the CPU, beside sklearn."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"scorer {scorer!r} needs the model's final layer as `model.head` (an nn.Linear)")
    return copy.deepcopy(head).float().cpu().eval()


@dataclass(frozen=True, eq=False)
class _FeatureScorer:
    """A fitted pytorch-ood detector scoring our (logits, features): the negated `predict_features`."""

    name: str
    predict: object  # pytorch-ood features (B, D) -> outlier scores (B,)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if features is None:
            raise ConfigError(f"scorer {self.name!r} needs the model's penultimate features")
        return -self.predict(features.detach().float().cpu()).double()


def _as_maps(features: torch.Tensor) -> torch.Tensor:
    return features[:, :, None, None]  # (B, D) -> (B, D, 1, 1): pytorch-ood's feature-map layout


def _id_fit_set(context: ScorerContext, scorer: str) -> IDFeatures:
    fit_set = context.id_features(scorer)
    if fit_set.features.shape[0] < 2:
        raise ConfigError(f"scorer {scorer!r}: the ID training set has {fit_set.features.shape[0]} images")
    return fit_set


@dataclass(frozen=True)
class ViMScorer:
    """ViM (Wang et al. 2022): energy minus alpha x the feature residual off the principal subspace.

    `dim` is the principal subspace's dimension; None takes half the feature dimension (OpenOOD uses
    256 of ResNet-18's 512).
    """

    name: str = "vim"
    dim: int | None = None
    needs_fit: bool = True

    def bind(self, context: ScorerContext) -> _FeatureScorer:
        fit_set = _id_fit_set(context, self.name)
        feature_dim = fit_set.features.shape[1]
        dim = self.dim if self.dim is not None else feature_dim // 2
        if not 1 <= dim < feature_dim:
            raise ConfigError(f"scorer {self.name!r}: dim must be in [1, {feature_dim}), got {dim}")
        head = _cpu_head(context.model, self.name)
        detector = ViM(None, d=dim, w=head.weight, b=head.bias).fit_features(fit_set.features, fit_set.labels)
        return _FeatureScorer(self.name, detector.predict_features)


@dataclass(frozen=True)
class KNNScorer:
    """Deep nearest neighbours (Sun et al. 2022): minus the distance of the unit-normalised feature to
    its k-th nearest ID training feature. k=50 is the paper's (and OpenOOD's) CIFAR-10 setting."""

    name: str = "knn"
    k: int = 50
    needs_fit: bool = True

    def bind(self, context: ScorerContext) -> _FeatureScorer:
        fit_set = _id_fit_set(context, self.name)
        if self.k > fit_set.features.shape[0]:
            raise ConfigError(f"scorer {self.name!r}: k={self.k} exceeds the {fit_set.features.shape[0]} ID images")
        detector = KNN(None, k=self.k).fit_features(fit_set.features, fit_set.labels)
        return _FeatureScorer(self.name, detector.predict_features)


@dataclass(frozen=True)
class MahalanobisScorer:
    """Mahalanobis (Lee et al. 2018): minus half the squared Mahalanobis distance to the nearest class mean,
    with one covariance shared by the classes. pytorch-ood's covariance is the unnormalised scatter
    matrix, so the distance is the textbook one divided by N (the ranking, and every metric, is the same)."""

    name: str = "mahalanobis"
    needs_fit: bool = True

    def bind(self, context: ScorerContext) -> _FeatureScorer:
        fit_set = _id_fit_set(context, self.name)
        missing = sorted(set(range(int(fit_set.labels.max()) + 1)) - set(fit_set.labels.tolist()))
        if missing:  # pytorch-ood asserts that every class 0..K-1 has a mean
            raise ConfigError(f"scorer {self.name!r}: the ID training set has no image of classes {missing}")
        detector = Mahalanobis(None).fit_features(fit_set.features, fit_set.labels)
        return _FeatureScorer(self.name, detector.predict_features)


@dataclass(frozen=True)
class ReActScorer:
    """ReAct (Sun et al. 2021) + energy: features clipped at their `percentile` over the ID training set,
    then the head, then logsumexp. 0.9 is the paper's percentile."""

    name: str = "react"
    percentile: float = 0.9
    needs_fit: bool = True

    def bind(self, context: ScorerContext) -> _FeatureScorer:
        fit_set = _id_fit_set(context, self.name)
        head = _cpu_head(context.model, self.name)
        detector = ReAct(None, head=lambda maps: head(maps.flatten(1)), percentile=self.percentile)
        detector.fit_feature_maps(_as_maps(fit_set.features), fit_set.labels)
        return _FeatureScorer(self.name, lambda features: detector.predict_feature_maps(_as_maps(features)))


@dataclass(frozen=True)
class ASHScorer:
    """ASH (Djurisic et al. 2023) + energy: per input, the lowest `percentile` of the features are zeroed
    and the rest shaped by `variant` (ash-s rescales, ash-p keeps, ash-b binarises). Nothing is fitted;
    0.9 is OpenOOD's percentile."""

    name: str = "ash"
    variant: str = "ash-s"
    percentile: float = 0.9
    needs_fit: bool = False

    def bind(self, context: ScorerContext) -> _FeatureScorer:
        if self.variant not in ASH.variants:
            raise ConfigError(f"scorer {self.name!r}: variant must be one of {sorted(ASH.variants)}")
        head = _cpu_head(context.model, self.name)
        detector = ASH(None, head=lambda maps: head(maps.flatten(1)), variant=self.variant, percentile=self.percentile)
        return _FeatureScorer(self.name, lambda features: detector.predict_feature_maps(_as_maps(features)))


@dataclass(frozen=True)
class DICEScorer:
    """DICE (Sun & Li 2022) + energy: the head's weights whose contribution (mean ID training feature x
    weight) is among the lowest fraction `p` are dropped. 0.9 is the paper's CIFAR sparsity."""

    name: str = "dice"
    p: float = 0.9
    needs_fit: bool = True

    def bind(self, context: ScorerContext) -> _FeatureScorer:
        fit_set = _id_fit_set(context, self.name)
        head = _cpu_head(context.model, self.name)
        detector = DICE(None, w=head.weight, b=head.bias, p=self.p, detector=EnergyBased.score)
        detector.fit_features(fit_set.features, fit_set.labels)
        return _FeatureScorer(self.name, detector.predict_features)


@dataclass(frozen=True, eq=False)
class _BoundODIN:
    name: str
    detector: ODIN

    def score_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return -self.detector.predict(x).double()  # pytorch-ood returns minus the tempered max softmax


@dataclass(frozen=True)
class ODINScorer:
    """ODIN (Liang et al. 2018): the max softmax at temperature T after one signed-gradient step of size
    eps (in [0, 1] pixel units) on the input, toward the predicted class. T=1000, eps=0.0014: the paper's."""

    name: str = "odin"
    temperature: float = 1000.0
    eps: float = 0.0014
    needs_fit: bool = False

    def bind(self, context: ScorerContext) -> _BoundODIN:
        detector = ODIN(context.model, eps=self.eps, temperature=self.temperature, norm_std=list(context.input_std))
        return _BoundODIN(self.name, detector)


for _detector in (
    ViMScorer(),
    KNNScorer(),
    MahalanobisScorer(),
    ReActScorer(),
    ASHScorer(),
    DICEScorer(),
    ODINScorer(),
):
    if _detector.name not in SCORERS:  # a scorer registered earlier under the same name keeps it
        register_scorer(_detector)
