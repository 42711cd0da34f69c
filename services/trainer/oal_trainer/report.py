"""Compare finished runs side by side: a markdown table (report.md) and grouped bars (report.png).

Each run directory must hold the metrics.json that `write_eval_outputs` wrote; a config.json beside
it, if present, gives the recipe name. One scorer is compared at a time (energy by default).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oal_shared.errors import ConfigError, OALError
from oal_trainer.evaluate_outputs import METRICS_FILE
from oal_trainer.metrics import (
    AUPR_IN,
    AUPR_OUT,
    AUROC,
    FPR95_ID_POSITIVE,
    FPR95_OOD_POSITIVE,
    HIGHER_IS_BETTER,
    METRIC_CONVENTIONS,
)
from oal_trainer.plots import plot_grouped_bars
from oal_trainer.scorers import DEFAULT_SCORER

CONFIG_FILE = "config.json"
REPORT_MARKDOWN = "report.md"
REPORT_FIGURE = "report.png"


class RunMetricsMissingError(OALError, FileNotFoundError):
    """A run directory given to the report has no metrics.json (the run was never evaluated)."""


class ReportInputError(OALError, ValueError):
    """A run's metrics.json or config.json is unreadable or lacks what the report needs."""


@dataclass(frozen=True)
class ReportColumn:
    key: str
    header: str
    higher_is_better: bool
    read: Callable[[dict[str, Any], str], float | None]  # (metrics, scorer) -> fraction, or None if absent


def _group_metric(group: str, metric: str) -> Callable[[dict[str, Any], str], float | None]:
    def read(metrics: dict[str, Any], scorer: str) -> float | None:
        return metrics["scores"][scorer].get(group, {}).get(metric)

    return read


COLUMNS: tuple[ReportColumn, ...] = (
    ReportColumn("id_accuracy", "ID acc", True, lambda metrics, _scorer: metrics["id_accuracy"]),
    *(
        ReportColumn(
            f"{group}_{metric}", f"{group} {header}", HIGHER_IS_BETTER[metric], _group_metric(group, metric)
        )
        for metric, header in (
            (AUROC, "AUROC"),
            (FPR95_OOD_POSITIVE, "FPR@95 OOD+"),
            (FPR95_ID_POSITIVE, "FPR@95 ID+"),
            (AUPR_IN, "AUPR-In"),
            (AUPR_OUT, "AUPR-Out"),
        )
        for group in ("near", "far")
    ),
)
FIGURE_COLUMNS = (
    "id_accuracy",
    f"near_{AUROC}",
    f"far_{AUROC}",
    f"near_{FPR95_OOD_POSITIVE}",
    f"far_{FPR95_OOD_POSITIVE}",
)


@dataclass(frozen=True)
class RunSummary:
    label: str  # the run directory's name (its path when two runs share a name)
    run_dir: Path
    recipe: str | None
    values: dict[str, float | None]  # ReportColumn.key -> fraction in [0, 1], None when the run lacks it


@dataclass(frozen=True)
class Report:
    scorer: str
    runs: tuple[RunSummary, ...]
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)  # "markdown", "figure" once written


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"run {run_dir}: cannot read {path.name} ({exc})") from exc
    if not isinstance(data, dict):
        raise ReportInputError(f"run {run_dir}: {path.name} must hold a JSON object")
    return data


def _recipe_name(run_dir: Path) -> str | None:
    """config.json's `recipe` (a name, or an object with a `name`), when the run has one."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    recipe = _read_json(path, run_dir).get("recipe")
    if isinstance(recipe, dict):
        recipe = recipe.get("name")
    return recipe if isinstance(recipe, str) else None


def _summarise(run_dir: Path, label: str, scorer: str) -> RunSummary:
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise RunMetricsMissingError(
            f"run {run_dir}: no {METRICS_FILE}; evaluate the run first or leave it out of the report"
        )
    metrics = _read_json(metrics_path, run_dir)
    scores = metrics.get("scores")
    if not isinstance(scores, dict) or "id_accuracy" not in metrics:
        raise ReportInputError(f"run {run_dir}: {METRICS_FILE} lacks 'scores' or 'id_accuracy'")
    if scorer not in scores:
        raise ReportInputError(
            f"run {run_dir}: scorer {scorer!r} not in {METRICS_FILE}; it has {sorted(scores)}"
        )
    values = {column.key: column.read(metrics, scorer) for column in COLUMNS}
    return RunSummary(label=label, run_dir=run_dir, recipe=_recipe_name(run_dir), values=values)


def _best_keys(runs: Sequence[RunSummary]) -> dict[str, float | None]:
    """Best value per column over the runs (max, or min where lower is better); ties share the mark."""
    best: dict[str, float | None] = {}
    for column in COLUMNS:
        present = [run.values[column.key] for run in runs if run.values[column.key] is not None]
        best[column.key] = (max(present) if column.higher_is_better else min(present)) if present else None
    return best


def _markdown(runs: Sequence[RunSummary], scorer: str) -> str:
    best = _best_keys(runs)
    lines = [
        f"# OOD detection report ({scorer} score)",
        "",
        "| run | recipe | " + " | ".join(column.header for column in COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for run in runs:
        cells = []
        for column in COLUMNS:
            value = run.values[column.key]
            text = "n/a" if value is None else f"{100 * value:.2f}"
            # Compare the printed numbers, so two runs that read the same are both marked.
            if value is not None and text == f"{100 * best[column.key]:.2f}":
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {run.label} | {run.recipe or '-'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Values in %. Bold: best per column (highest; lowest for FPR@95). near/far: mean over the OOD sets "
        "of that kind.",
        "",
        "Conventions:",
        "",
        f"- score: {METRIC_CONVENTIONS['score']}",
        f"- AUROC: {METRIC_CONVENTIONS[AUROC]}",
        f"- FPR@95 OOD+: {METRIC_CONVENTIONS[FPR95_OOD_POSITIVE]}",
        f"- FPR@95 ID+: {METRIC_CONVENTIONS[FPR95_ID_POSITIVE]}",
        f"- AUPR-In: {METRIC_CONVENTIONS[AUPR_IN]}",
        f"- AUPR-Out: {METRIC_CONVENTIONS[AUPR_OUT]}",
        "",
    ]
    return "\n".join(lines)


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [run_dir.name for run_dir in run_dirs]
    # Two runs may share a directory name (runs/a/oal, runs/b/oal); then the full path tells them apart.
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs, strict=True)]


def _percent_or_nan(value: float | None) -> float:
    return math.nan if value is None else 100 * value


def build_report(run_dirs: Sequence[Path], out_dir: Path | None, *, scorer: str = DEFAULT_SCORER) -> Report:
    """Read each run's metrics.json, build the side-by-side table, write report.md and report.png.

    With `out_dir` None nothing is written; the markdown is in `Report.markdown`.
    """
    if not run_dirs:
        raise ConfigError("run_dirs must name at least one run directory")
    paths = [Path(run_dir) for run_dir in run_dirs]
    runs = tuple(_summarise(path, label, scorer) for path, label in zip(paths, _labels(paths), strict=True))
    markdown = _markdown(runs, scorer)
    written: dict[str, Path] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written["markdown"] = out_dir / REPORT_MARKDOWN
        written["markdown"].write_text(markdown, encoding="utf-8")
        headers = {column.key: column.header for column in COLUMNS}
        series = {run.label: [_percent_or_nan(run.values[key]) for key in FIGURE_COLUMNS] for run in runs}
        written["figure"] = plot_grouped_bars(
            [headers[key] for key in FIGURE_COLUMNS],
            series,
            out_dir / REPORT_FIGURE,
            title=f"Runs compared ({scorer} score)",
            ylabel="% (FPR: lower is better)",
        )
    return Report(scorer=scorer, runs=runs, markdown=markdown, paths=written)
