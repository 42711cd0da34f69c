"""Stage E: score every image of a benchmark and compute its OOD metrics.

Flow: `evaluate_model` runs the ID test set and every OOD set through the model once, keeping per
image the label, the predicted class and one score per scorer (an `EvalResult`). `EvalResult.metrics()`
turns those into the metrics dict; oal_trainer.evaluate_outputs writes it into the run dir and renders
it for a terminal.

"near" and "far" in the metrics are unweighted means over the OOD sets of that kind, as in OpenOOD.

Scorers that are fitted (ViM, KNN, ... from oal_trainer.detectors) are bound to the model first,
fitted on its features of the ID training images handed in as `id_train` (oal_trainer.id_features
caches them in the run dir); ODIN-like scorers get each batch's inputs with autograd on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from oal_shared.errors import ConfigError, OALError
from oal_shared.settings import get_settings
from oal_trainer.data.streamed import uint8_batches
from oal_trainer.metrics import METRIC_CONVENTIONS, accuracy, mean_metrics, ood_metrics
from oal_trainer.scorers import (
    IDFeatures,
    InputScorer,
    Scorer,
    ScorerContext,
    bind_scorer,
    get_scorer,
    needs_fit,
)

if TYPE_CHECKING:
    from oal_shared.data.benchmark import Benchmark, ImageSet
    from oal_trainer.data import IDTrainSet

logger = logging.getLogger(__name__)

DEFAULT_SCORERS = ("energy", "msp", "max_logit")
OOD_GROUPS = ("near", "far")  # metric keys of the per-kind means; no data set may use these names

GROUP_CONVENTIONS = {
    "near": "near: unweighted mean over the near-OOD sets",
    "far": "far: unweighted mean over the far-OOD sets",
}


class EvaluationError(OALError, ValueError):
    """The model or benchmark cannot be evaluated as given; the message names what is wrong."""


@dataclass(frozen=True, eq=False)
class SetScores:
    """Per-image outcome on one image set; arrays are row-aligned."""

    name: str
    kind: str  # "id" | "near" | "far"
    labels: np.ndarray  # (N,) int64, class index or -1 for OOD
    preds: np.ndarray  # (N,) int64, argmax of the logits
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # scorer name -> (N,) float64, higher = ID

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class EvalResult:
    """What `evaluate_model` saw: the ID test set and each OOD set (near sets first, then far)."""

    benchmark: str
    scorer_names: tuple[str, ...]
    id_set: SetScores
    ood_sets: tuple[SetScores, ...]

    def __post_init__(self) -> None:
        names = [image_set.name for image_set in self.sets]
        if len(set(names)) != len(names):
            raise EvaluationError(f"benchmark {self.benchmark!r}: image set names must be unique: {names}")
        clashes = sorted(set(names) & set(OOD_GROUPS))
        if clashes:
            raise EvaluationError(f"benchmark {self.benchmark!r}: set names {clashes} are reserved")
        if not self.ood_sets:
            raise EvaluationError(f"benchmark {self.benchmark!r} has no OOD sets to score against")

    @property
    def sets(self) -> tuple[SetScores, ...]:
        return (self.id_set, *self.ood_sets)

    def id_accuracy(self) -> float:
        return accuracy(self.id_set.preds, self.id_set.labels)

    def per_set_metrics(self, scorer: str) -> dict[str, dict[str, float]]:
        """{dataset: metrics} for each OOD set, then "near"/"far" means for the kinds present."""
        id_scores = self.id_set.scores[scorer]
        results: dict[str, dict[str, float]] = {}
        for group in OOD_GROUPS:
            members = [s for s in self.ood_sets if s.kind == group]
            for member in members:
                results[member.name] = ood_metrics(id_scores, member.scores[scorer])
            if members:
                results[group] = mean_metrics([results[member.name] for member in members])
        return results

    def metrics(self) -> dict[str, Any]:
        """metrics.json: id_accuracy, conventions, and scores[scorer][dataset|near|far][metric]."""
        return {
            "benchmark": self.benchmark,
            "id_dataset": self.id_set.name,
            "id_accuracy": self.id_accuracy(),
            "datasets": {s.name: {"kind": s.kind, "num_images": len(s)} for s in self.sets},
            "conventions": {**METRIC_CONVENTIONS, **GROUP_CONVENTIONS},
            "scores": {scorer: self.per_set_metrics(scorer) for scorer in self.scorer_names},
        }


def _normalizer(
    benchmark: Benchmark, normalize: tuple[Sequence[float], Sequence[float]] | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = normalize if normalize is not None else (benchmark.mean, benchmark.std)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    for name, values in (("mean", mean_t), ("std", std_t)):
        if values.numel() not in (1, channels):
            raise ConfigError(f"normalize {name} needs 1 or {channels} values, got {values.numel()}")
    if (std_t <= 0).any():
        raise ConfigError(f"normalize std must be > 0, got {std_t.tolist()}")
    return mean_t.reshape(1, -1, 1, 1), std_t.reshape(1, -1, 1, 1)  # (1, C, 1, 1) each


def _to_model_input(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, 3) -> float (B, C, H, W), scaled to [0, 1] then standardised."""
    x = torch.tensor(images, dtype=torch.float32).div_(255.0)  # copies: benchmark arrays are read-only
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
    return (x - mean) / std


def _score_set(
    model: nn.Module,
    image_set: ImageSet,
    scorers: dict[str, Scorer | InputScorer],
    *,
    batch_size: int,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
    num_classes: int,
) -> SetScores:
    preds, scores = [], {name: [] for name in scorers}
    # Images on disk are decoded batch by batch in DataLoader workers: memory stays one batch.
    for batch in uint8_batches(image_set.images, batch_size, num_workers=get_settings().id_stream_workers):
        x = _to_model_input(batch, mean, std).to(device)
        with torch.inference_mode():
            output = model(x, return_feature=True)
        if not (isinstance(output, tuple) and len(output) == 2):
            raise EvaluationError("model(x, return_feature=True) must return (logits, features)")
        logits, features = output  # (B, K), (B, D)
        if logits.dim() != 2 or logits.shape != (x.shape[0], num_classes):
            raise EvaluationError(
                f"model logits have shape {tuple(logits.shape)}, expected ({x.shape[0]}, {num_classes}) "
                f"for the benchmark's {num_classes} classes"
            )
        logits = logits.float()
        preds.append(logits.argmax(dim=1).cpu())
        for name, scorer in scorers.items():
            if isinstance(scorer, InputScorer):
                value = scorer.score_inputs(x)  # outside inference mode: it may need input gradients
            else:
                with torch.inference_mode():
                    value = scorer(logits, features)
            if value.shape != (x.shape[0],):
                raise EvaluationError(f"scorer {name!r} returned shape {tuple(value.shape)}, expected ({x.shape[0]},)")
            scores[name].append(value.detach().double().cpu())
    return SetScores(
        name=image_set.name,
        kind=image_set.kind,
        labels=np.asarray(image_set.labels, dtype=np.int64),
        preds=torch.cat(preds).numpy().astype(np.int64),
        scores={name: torch.cat(chunks).numpy() for name, chunks in scores.items()},
    )


def _fit_features(
    model: nn.Module, id_train: IDTrainSet | None, batch_size: int, device: torch.device, cache: Path | None
) -> Callable[[], IDFeatures] | None:
    """A loader of the model's ID training features, run (or read from `cache`) on first call only."""
    if id_train is None:
        return None
    from oal_trainer.id_features import id_train_features

    computed: list[IDFeatures] = []

    def load() -> IDFeatures:
        if not computed:
            computed.append(
                id_train_features(
                    model, id_train.images, id_train.labels, batch_size=batch_size, device=device, cache_path=cache
                )
            )
        return computed[0]

    return load


def evaluate_model(
    model: nn.Module,
    benchmark: Benchmark,
    *,
    scorers: Sequence[str] = DEFAULT_SCORERS,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    id_train: IDTrainSet | None = None,
    features_cache: Path | None = None,
) -> EvalResult:
    """Score the ID test set and every OOD set of `benchmark` with each named scorer.

    `normalize` = (mean, std) per channel in [0, 1] units; None uses the benchmark's own. The model
    is moved to `device`, run in eval mode, and put back into the mode it was in. Scorers that are
    fitted (`needs_fit`) fit on the model's features of `id_train` (the run's ID training images,
    standardised), read from / written to `features_cache` when given.
    """
    scorer_names = tuple(scorers)
    if not scorer_names:
        raise ConfigError("scorers must name at least one scorer")
    for name in scorer_names:
        get_scorer(name)  # unknown names fail here, before any compute
    if needs_fit(scorer_names) and id_train is None:
        fitted = [name for name in scorer_names if getattr(get_scorer(name), "needs_fit", False)]
        raise ConfigError(f"scorers {fitted} are fitted on the ID training set: pass id_train")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    channels = 1 if benchmark.id_test.images.ndim == 3 else 3
    mean, std = _normalizer(benchmark, normalize, channels)
    target = torch.device(device)
    num_classes = len(benchmark.class_names)
    was_training = model.training
    model.to(target).eval()
    try:
        context = ScorerContext(
            model=model,
            device=target,
            input_std=tuple(float(v) for v in std.flatten().expand(channels)),
            id_train=_fit_features(model, id_train, batch_size, target, features_cache),
        )
        scorers = {name: bind_scorer(name, context) for name in scorer_names}
        results = []
        for image_set in (benchmark.id_test, *benchmark.near, *benchmark.far):
            results.append(
                _score_set(
                    model,
                    image_set,
                    scorers,
                    batch_size=batch_size,
                    device=target,
                    mean=mean,
                    std=std,
                    num_classes=num_classes,
                )
            )
            logger.info("Evaluated %s (%s): %d images", image_set.name, image_set.kind, len(image_set))
    finally:
        model.train(was_training)
    return EvalResult(benchmark.name, scorer_names, results[0], tuple(results[1:]))
