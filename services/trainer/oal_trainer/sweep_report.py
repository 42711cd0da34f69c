"""`oal-train report SWEEP_DIR --baseline ce`: a sweep's results over seeds, with intervals and paired tests.

Writes into the sweep folder (or `--out`):
  sweep_report.md    per cell: mean and 95% interval over seeds; per baseline: paired differences
                     (same seed), their t and bootstrap intervals, Wilcoxon p, and a verdict in words
  sweep_report.png   bars with 95% error bars for the headline metrics
  sweep_results.csv  per cell and data set, OpenOOD's columns first (dataset, FPR@95, AUROC,
                     AUPR_IN, AUPR_OUT, ACC), then the seed count and each metric's interval

Statistics: oal_trainer.stats (docs/TRAINER.md, Sweeps).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oal_shared.errors import ConfigError
from oal_trainer.evaluate_outputs import METRICS_FILE, OPENOOD_GROUP_ROWS
from oal_trainer.metrics import AUPR_IN, AUPR_OUT, AUROC, FPR95_OOD_POSITIVE, HIGHER_IS_BETTER
from oal_trainer.plots import plot_grouped_bars
from oal_trainer.report import COLUMNS, FIGURE_COLUMNS, ReportInputError
from oal_trainer.scorers import DEFAULT_SCORER
from oal_trainer.stats import PairedDifference, Summary, paired_difference, summarise
from oal_trainer.sweep import SWEEP_FILE

SWEEP_MARKDOWN = "sweep_report.md"
SWEEP_FIGURE = "sweep_report.png"
SWEEP_CSV = "sweep_results.csv"
#: Metrics a verdict is given for (the rest are in the CSV).
VERDICT_COLUMNS = (
    "id_accuracy",
    f"near_{AUROC}",
    f"far_{AUROC}",
    f"near_{FPR95_OOD_POSITIVE}",
    f"far_{FPR95_OOD_POSITIVE}",
)
_CSV_METRICS = (FPR95_OOD_POSITIVE, AUROC, AUPR_IN, AUPR_OUT)
_HEADERS = {column.key: column.header for column in COLUMNS}


@dataclass(frozen=True)
class CellResults:
    name: str
    recipe: str
    values: dict[int, dict[str, float | None]]  # seed -> column key -> fraction
    per_set: dict[int, dict[str, dict[str, float]]]  # seed -> data set -> metric -> fraction
    accuracy: dict[int, float]
    missing_seeds: tuple[int, ...]  # seeds whose run has no metrics yet


@dataclass(frozen=True)
class SweepReport:
    markdown: str
    cells: tuple[CellResults, ...]
    summaries: dict[str, dict[str, Summary]]  # cell -> column key -> summary
    differences: dict[str, dict[str, dict[str, PairedDifference]]]  # baseline -> cell -> column key
    paths: dict[str, Path] = field(default_factory=dict)


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def load_cells(sweep_dir: Path, scorer: str) -> tuple[CellResults, ...]:
    record = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in record["runs"]:
        grouped.setdefault(run["cell"], []).append(run)
    cells = []
    for name, runs in grouped.items():
        values, per_set, accuracy, missing = {}, {}, {}, []
        for run in runs:
            path = sweep_dir / name / f"seed-{run['seed']}" / METRICS_FILE
            if not path.is_file():
                missing.append(run["seed"])
                continue
            metrics = json.loads(path.read_text(encoding="utf-8"))
            if scorer not in metrics.get("scores", {}):
                raise ReportInputError(f"{path}: scorer {scorer!r} missing; it has {sorted(metrics.get('scores', {}))}")
            values[run["seed"]] = {column.key: column.read(metrics, scorer) for column in COLUMNS}
            per_set[run["seed"]] = metrics["scores"][scorer]
            accuracy[run["seed"]] = metrics["id_accuracy"]
        cells.append(CellResults(name, runs[0]["config"]["recipe"], values, per_set, accuracy, tuple(missing)))
    return tuple(cells)


def _column_values(cell: CellResults, key: str, seeds: Sequence[int]) -> list[float]:
    return [cell.values[seed][key] for seed in seeds if cell.values[seed].get(key) is not None]


def _pp(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:+.2f}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def verdict(key: str, difference: PairedDifference) -> str:
    if difference.n < 2:
        return "one seed: no interval"
    if not difference.distinguishable:
        return "not distinguishable from noise"
    metric = key.split("_", 1)[1] if key != "id_accuracy" else None
    higher_better = True if metric is None else HIGHER_IS_BETTER[metric]
    return "better" if (difference.mean > 0) == higher_better else "worse"


def _summary_table(cells: Sequence[CellResults], summaries: dict[str, dict[str, Summary]]) -> list[str]:
    keys = VERDICT_COLUMNS
    lines = [
        "| cell | recipe | seeds | " + " | ".join(_HEADERS[key] for key in keys) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for cell in cells:
        cells_text = []
        for key in keys:
            summary = summaries[cell.name][key]
            ci = "" if math.isnan(summary.half_width) else f" ± {100 * summary.half_width:.2f}"
            cells_text.append(f"{_pct(summary.mean)}{ci}")
        lines.append(f"| {cell.name} | {cell.recipe} | {len(cell.values)} | " + " | ".join(cells_text) + " |")
    return lines


def _difference_table(baseline: str, differences: dict[str, dict[str, PairedDifference]]) -> list[str]:
    lines = [
        f"### Paired against `{baseline}` (cell minus {baseline}, same seed; percentage points)",
        "",
        "| cell | metric | seeds | mean diff | 95% t interval | 95% bootstrap | Wilcoxon p | verdict |",
        "| --- | --- | ---: | ---: | --- | --- | ---: | --- |",
    ]
    for cell_name, by_key in differences.items():
        for key in VERDICT_COLUMNS:
            d = by_key[key]
            p = "n/a" if math.isnan(d.wilcoxon_p) else f"{d.wilcoxon_p:.3f}"
            lines.append(
                f"| {cell_name} | {_HEADERS[key]} | {d.n} | {_pp(d.mean)} | [{_pp(d.ci_low)}, {_pp(d.ci_high)}] "
                f"| [{_pp(d.bootstrap_low)}, {_pp(d.bootstrap_high)}] | {p} | {verdict(key, d)} |"
            )
    return lines


def _in_words(differences: dict[str, dict[str, dict[str, PairedDifference]]]) -> list[str]:
    sentences = []
    for baseline, by_cell in differences.items():
        for cell_name, by_key in by_cell.items():
            called = [
                f"{verdict(key, d)} on {_HEADERS[key]} ({_pp(d.mean)} pp, 95% CI [{_pp(d.ci_low)}, {_pp(d.ci_high)}])"
                for key, d in by_key.items()
                if d.distinguishable
            ]
            if called:
                sentences.append(f"- `{cell_name}` vs `{baseline}`: " + "; ".join(called) + ".")
            else:
                seeds = max((d.n for d in by_key.values()), default=0)
                sentences.append(
                    f"- `{cell_name}` vs `{baseline}`: no difference distinguishable from noise over {seeds} seeds."
                )
    return sentences


def _paired(cells: dict[str, CellResults], baseline: str) -> dict[str, dict[str, PairedDifference]]:
    base = cells[baseline]
    result: dict[str, dict[str, PairedDifference]] = {}
    for name, cell in cells.items():
        if name == baseline:
            continue
        shared = sorted(set(cell.values) & set(base.values))
        if len(shared) < 2:  # e.g. a one-seed teacher: a pair of one has no interval to report
            continue
        result[name] = {}
        for key in VERDICT_COLUMNS:
            pairs = [
                (cell.values[s][key], base.values[s][key])
                for s in shared
                if cell.values[s].get(key) is not None and base.values[s].get(key) is not None
            ]
            result[name][key] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    return result


def _write_csv(path: Path, cells: Sequence[CellResults]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "cell",
                "dataset",
                "FPR@95",
                "AUROC",
                "AUPR_IN",
                "AUPR_OUT",
                "ACC",
                "seeds",
                *(f"{name}_ci95" for name in ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")),
            ]
        )
        for cell in cells:
            seeds = sorted(cell.per_set)
            if not seeds:
                continue
            accuracy = summarise([cell.accuracy[s] for s in seeds])
            for dataset in cell.per_set[seeds[0]]:
                summaries = [summarise([cell.per_set[s][dataset][metric] for s in seeds]) for metric in _CSV_METRICS]
                writer.writerow(
                    [
                        cell.name,
                        OPENOOD_GROUP_ROWS.get(dataset, dataset),
                        *(f"{100 * s.mean:.2f}" for s in summaries),
                        f"{100 * accuracy.mean:.2f}",
                        len(seeds),
                        *(_pct(s.half_width) for s in (*summaries, accuracy)),
                    ]
                )
    return path


def build_sweep_report(
    sweep_dir: Path,
    baselines: Sequence[str] = (),
    *,
    scorer: str = DEFAULT_SCORER,
    write: bool = True,
    out_dir: Path | None = None,
    only: Sequence[str] = (),
) -> SweepReport:
    """The report of a sweep folder; its files go into `out_dir` (default: the sweep folder).

    `only` keeps those cells, in that order (a big sweep's figure is unreadable otherwise)."""
    sweep_dir = Path(sweep_dir)
    if not is_sweep_dir(sweep_dir):
        raise ConfigError(f"{sweep_dir}: no {SWEEP_FILE}; is it a folder made by `oal-train sweep`?")
    cells = load_cells(sweep_dir, scorer)
    by_name = {cell.name: cell for cell in cells}
    for name in only:
        if name not in by_name:
            raise ConfigError(f"--cell {name}: no such cell; cells: {', '.join(by_name)}")
    if only:
        cells = tuple(by_name[name] for name in dict.fromkeys([*only, *baselines]))
        by_name = {cell.name: cell for cell in cells}
    for baseline in baselines:
        if baseline not in by_name:
            raise ConfigError(f"--baseline {baseline}: no such cell; cells: {', '.join(by_name)}")
    summaries = {
        cell.name: {key: summarise(_column_values(cell, key, sorted(cell.values))) for key in _HEADERS}
        for cell in cells
    }
    differences = {baseline: _paired(by_name, baseline) for baseline in baselines}
    lines = [
        f"# Sweep report ({scorer} score): {sweep_dir.name}",
        "",
        "Values in %: mean ± half-width of the 95% t interval over seeds. FPR@95 is OpenOOD's (OOD positive).",
        "",
        *_summary_table(cells, summaries),
        "",
    ]
    incomplete = [
        f"{cell.name} (seeds {', '.join(map(str, cell.missing_seeds))})" for cell in cells if cell.missing_seeds
    ]
    if incomplete:
        lines += [f"Runs without metrics yet, left out: {'; '.join(incomplete)}.", ""]
    unpaired = sorted(
        {cell.name for cell in cells for by_cell in differences.values() if cell.name not in by_cell} - set(differences)
    )
    if differences:
        lines += ["## Paired differences", ""]
        if unpaired:
            lines += [f"Not paired (fewer than 2 seeds shared with the baseline): {', '.join(unpaired)}.", ""]
        for baseline, by_cell in differences.items():
            lines += [*_difference_table(baseline, by_cell), ""]
        lines += ["## In words", "", *_in_words(differences), ""]
        lines += [
            "A difference is called better or worse when its 95% t interval excludes zero; the bootstrap interval "
            "and the Wilcoxon signed-rank p are checks without a normality assumption (at 5 seeds the exact "
            "two-sided Wilcoxon p cannot go below 0.0625).",
            "",
        ]
    report = SweepReport("\n".join(lines), cells, summaries, differences)
    if write:
        target = Path(out_dir) if out_dir is not None else sweep_dir
        target.mkdir(parents=True, exist_ok=True)
        report.paths["markdown"] = target / SWEEP_MARKDOWN
        report.paths["markdown"].write_text(report.markdown, encoding="utf-8")
        report.paths["csv"] = _write_csv(target / SWEEP_CSV, cells)
        series = {cell.name: [100 * summaries[cell.name][k].mean for k in FIGURE_COLUMNS] for cell in cells}
        errors = {cell.name: [100 * summaries[cell.name][k].half_width for k in FIGURE_COLUMNS] for cell in cells}
        report.paths["figure"] = plot_grouped_bars(
            [_HEADERS[k] for k in FIGURE_COLUMNS],
            series,
            target / SWEEP_FIGURE,
            title=f"Sweep {sweep_dir.name}: mean and 95% interval over seeds ({scorer})",
            ylabel="% (FPR: lower is better)",
            errors=errors,
        )
    return report
