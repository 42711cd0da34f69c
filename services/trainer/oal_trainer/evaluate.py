"""Stage E: score every image of a benchmark, compute OOD metrics, write the run's evaluation files.

Flow: `evaluate_model` runs the ID test set and every OOD set through the model once, keeping per
image the label, the predicted class and one score per scorer (an `EvalResult`). `EvalResult.metrics()`
turns those into the metrics dict; `write_eval_outputs` writes it with the per-image scores, an
OpenOOD-style results table and two figures; `metrics_table` renders it for a terminal.

"near" and "far" in the metrics are unweighted means over the OOD sets of that kind, as in OpenOOD.

Scorers that are fitted (ViM, KNN, ... from oal_trainer.detectors) are bound to the model first,
fitted on its features of the ID training images handed in as `id_train` (oal_trainer.id_features
caches them in the run dir); ODIN-like scorers get each batch's inputs with autograd on.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.table import Table
from torch import nn

from oal_shared.errors import ConfigError, OALError
from oal_shared.settings import get_settings
from oal_trainer.data.streamed import uint8_batches
from oal_trainer.metrics import (
    AUPR_IN,
    AUPR_OUT,
    AUROC,
    FPR95_ID_POSITIVE,
    FPR95_OOD_POSITIVE,
    METRIC_CONVENTIONS,
    accuracy,
    mean_metrics,
    ood_metrics,
)
from oal_trainer.plots import plot_roc_curves, plot_score_histograms
from oal_trainer.scorers import (
    DEFAULT_SCORER,
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
OPENOOD_GROUP_ROWS = {"near": "nearood", "far": "farood"}  # OpenOOD's names for the mean rows

# Output file names in the run directory.
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
RESULTS_FILE = "results.csv"
ROC_FILE = "roc.png"
SCORE_HIST_FILE = "score_hist.png"

SCORES_FIXED_COLUMNS = ("dataset", "kind", "label", "pred")  # then one `score_<scorer>` column per scorer
# OpenOOD v1.5's results.csv columns in its order (values x100, FPR under its OOD-positive convention),
# then `scorer`: one file holds every scorer; filter on it to get OpenOOD's table for one.
RESULTS_COLUMNS = ("dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC", "scorer")

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


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def _write_scores_csv(path: Path, result: EvalResult) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*SCORES_FIXED_COLUMNS, *(f"score_{name}" for name in result.scorer_names)])
        for image_set in result.sets:
            columns = [image_set.scores[name] for name in result.scorer_names]
            for row in range(len(image_set)):
                writer.writerow(
                    [
                        image_set.name,
                        image_set.kind,
                        int(image_set.labels[row]),
                        int(image_set.preds[row]),
                        *(f"{column[row]:.9g}" for column in columns),
                    ]
                )
    return path


def _write_results_csv(path: Path, result: EvalResult, metrics: dict[str, Any]) -> Path:
    accuracy_pct = f"{100 * metrics['id_accuracy']:.2f}"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(RESULTS_COLUMNS)
        for scorer in result.scorer_names:
            for dataset, values in metrics["scores"][scorer].items():
                row_name = OPENOOD_GROUP_ROWS.get(dataset, dataset)
                percent = [f"{100 * values[key]:.2f}" for key in (FPR95_OOD_POSITIVE, AUROC, AUPR_IN, AUPR_OUT)]
                writer.writerow([row_name, *percent, accuracy_pct, scorer])
    return path


def write_eval_outputs(run_dir: Path, result: EvalResult, *, plot_scorer: str | None = None) -> dict[str, Path]:
    """Write metrics.json, scores.csv, results.csv, roc.png and score_hist.png into `run_dir`.

    scores.csv: one row per image, columns `dataset, kind, label, pred, score_<scorer>...`.
    results.csv: OpenOOD v1.5's columns `dataset, FPR@95, AUROC, AUPR_IN, AUPR_OUT, ACC` (x100, FPR
    with OOD positive), then `scorer`; per scorer one row per OOD set, with `nearood`/`farood` means
    after the near and the far sets. The figures show `plot_scorer` (default: energy if evaluated,
    else the first scorer). Returns {"metrics", "scores", "results", "roc", "score_hist"} -> path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    default = DEFAULT_SCORER if DEFAULT_SCORER in result.scorer_names else result.scorer_names[0]
    scorer = plot_scorer or default
    if scorer not in result.scorer_names:
        raise ConfigError(f"plot_scorer {scorer!r} was not evaluated; evaluated: {list(result.scorer_names)}")
    metrics = result.metrics()
    id_scores = result.id_set.scores[scorer]
    by_group = {
        group: np.concatenate([s.scores[scorer] for s in result.ood_sets if s.kind == group])
        for group in OOD_GROUPS
        if any(s.kind == group for s in result.ood_sets)
    }
    title = f"{result.benchmark}: {scorer} score"
    return {
        "metrics": _write_json(run_dir / METRICS_FILE, metrics),
        "scores": _write_scores_csv(run_dir / SCORES_FILE, result),
        "results": _write_results_csv(run_dir / RESULTS_FILE, result, metrics),
        "roc": plot_roc_curves(
            id_scores, {s.name: s.scores[scorer] for s in result.ood_sets}, run_dir / ROC_FILE, title=title
        ),
        "score_hist": plot_score_histograms(
            id_scores, by_group, run_dir / SCORE_HIST_FILE, title=title, score_label=scorer
        ),
    }


_TABLE_COLUMNS = (
    (AUROC, "AUROC"),
    (FPR95_OOD_POSITIVE, "FPR@95 OOD+"),
    (FPR95_ID_POSITIVE, "FPR@95 ID+"),
    (AUPR_IN, "AUPR-In"),
    (AUPR_OUT, "AUPR-Out"),
)


def metrics_table(metrics: dict[str, Any], scorer: str = DEFAULT_SCORER) -> Table:
    """A rich table of one scorer's metrics (in %), one row per OOD set and per near/far mean.

    The caption states ID accuracy and every metric's convention, so a screenshot stays unambiguous.
    """
    available = metrics.get("scores", {})
    if scorer not in available:
        raise ConfigError(f"scorer {scorer!r} is not in these metrics; available: {sorted(available)}")
    conventions = metrics.get("conventions", METRIC_CONVENTIONS)
    accuracy_pct = 100 * metrics["id_accuracy"]
    caption = [f"ID accuracy {accuracy_pct:.2f}%. Values in %. Score: {conventions['score']}."]
    caption += [f"{label}: {conventions[key]}" for key, label in _TABLE_COLUMNS if key in conventions]
    table = Table(
        title=f"{metrics.get('benchmark', 'benchmark')}: {scorer} score",
        caption="\n".join(caption),
        caption_justify="left",
    )
    table.add_column("dataset")
    table.add_column("kind")
    for _, label in _TABLE_COLUMNS:
        table.add_column(label, justify="right")
    datasets = metrics.get("datasets", {})
    for dataset, values in available[scorer].items():
        is_group = dataset in OOD_GROUPS
        kind = f"{dataset} mean" if is_group else datasets.get(dataset, {}).get("kind", "")
        cells = [f"{100 * values[key]:.2f}" for key, _ in _TABLE_COLUMNS]
        table.add_row(dataset, kind, *cells, style="bold" if is_group else None)
    return table
