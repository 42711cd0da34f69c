"""The run's evaluation files and the terminal view of its metrics (Stage E's output side).

`write_eval_outputs` writes an `EvalResult` (oal_trainer.evaluate) into the run dir: metrics.json,
the per-image scores, an OpenOOD-style results table and two figures. `metrics_table` renders a
metrics dict (as read back from metrics.json) as a rich table for a terminal.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from oal_shared.errors import ConfigError
from oal_trainer.evaluate import OOD_GROUPS, EvalResult
from oal_trainer.metrics import (
    AUPR_IN,
    AUPR_OUT,
    AUROC,
    FPR95_ID_POSITIVE,
    FPR95_OOD_POSITIVE,
    METRIC_CONVENTIONS,
)
from oal_trainer.plots import plot_roc_curves, plot_score_histograms
from oal_trainer.scorers import DEFAULT_SCORER

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
