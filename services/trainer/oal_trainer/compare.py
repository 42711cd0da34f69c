"""`oal-train compare`: our runs beside published OpenOOD v1.5 rows, each row saying where it comes from.

Rows run here come from run dirs (one row each) or sweep folders (one row per cell, mean ± std
over its seeds); published rows come from `oal_trainer.published`, each citing its file. The
table says which rows were run here, on which benchmark, and whether a row can be compared with
the published ones at all: only runs on the same benchmark (cifar10 / cifar100 with OpenOOD v1.5's
splits) can; the embedded `fmnist-osr` has other ID data, other OOD sets and smaller models.

Written as compare.md (the table, the notes, the sources) and compare.csv (one row per line).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oal_shared.errors import ConfigError
from oal_trainer.evaluate_outputs import METRICS_FILE
from oal_trainer.metrics import AUROC
from oal_trainer.published import PUBLISHED, PUBLISHED_BENCHMARKS, SOURCE_URLS, Measure
from oal_trainer.report import ReportInputError, RunMetricsMissingError
from oal_trainer.scorers import DEFAULT_SCORER

COMPARE_MARKDOWN = "compare.md"
COMPARE_CSV = "compare.csv"
CSV_COLUMNS = (
    "origin",
    "benchmark",
    "comparable",
    "training",
    "score",
    "near_auroc",
    "far_auroc",
    "id_accuracy",
    "seeds",
    "source",
)


@dataclass(frozen=True)
class CompareRow:
    origin: str  # "run here" | "published"
    benchmark: str
    training: str  # recipe or sweep cell here; OpenOOD's training method for published rows
    score: str
    near_auroc: Measure | None
    far_auroc: Measure | None
    id_accuracy: Measure | None
    seeds: int | None  # runs behind the numbers (None: not stated)
    source: str  # run dir, or the citation

    @property
    def comparable(self) -> str:
        if self.origin == "published":
            return "-"
        if self.benchmark in PUBLISHED_BENCHMARKS:
            return f"yes, with the {self.benchmark} rows"
        return f"no: {self.benchmark} is not a CIFAR benchmark"


@dataclass(frozen=True)
class Comparison:
    rows: tuple[CompareRow, ...]
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)


def _measure(values: Sequence[float | None]) -> Measure | None:
    present = [100 * v for v in values if v is not None]
    if not present:
        return None
    return Measure(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None)


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise RunMetricsMissingError(f"run {run_dir}: no {METRICS_FILE}; evaluate the run first or leave it out")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"run {run_dir}: cannot read {METRICS_FILE} ({exc})") from exc
    if not isinstance(metrics, dict) or "scores" not in metrics or "id_accuracy" not in metrics:
        raise ReportInputError(f"run {run_dir}: {METRICS_FILE} lacks 'scores' or 'id_accuracy'")
    return metrics


def _group_auroc(metrics: dict[str, Any], scorer: str, group: str, where: Path) -> float | None:
    scores = metrics["scores"]
    if scorer not in scores:
        raise ReportInputError(f"run {where}: scorer {scorer!r} not in {METRICS_FILE}; it has {sorted(scores)}")
    return scores[scorer].get(group, {}).get(AUROC)


def _recipe(run_dir: Path) -> str:
    path = run_dir / "config.json"
    if path.is_file():
        recipe = json.loads(path.read_text(encoding="utf-8")).get("recipe")
        if isinstance(recipe, str):
            return recipe
    return run_dir.name


def _row_from_runs(runs: Sequence[tuple[str, Path]], scorer: str, source: str) -> CompareRow:
    """One row from the run dirs of one run or one sweep cell (mean ± std over them)."""
    loaded = [(path, _read_metrics(path)) for _, path in runs]
    benchmarks = {metrics.get("benchmark", "?") for _, metrics in loaded}
    if len(benchmarks) != 1:
        raise ReportInputError(f"{source}: its runs are on different benchmarks {sorted(benchmarks)}")
    return CompareRow(
        origin="run here",
        benchmark=benchmarks.pop(),
        training=runs[0][0],
        score=scorer,
        near_auroc=_measure([_group_auroc(m, scorer, "near", p) for p, m in loaded]),
        far_auroc=_measure([_group_auroc(m, scorer, "far", p) for p, m in loaded]),
        id_accuracy=_measure([m["id_accuracy"] for _, m in loaded]),
        seeds=len(loaded),
        source=source,
    )


def _our_rows(paths: Sequence[Path], scorer: str) -> list[CompareRow]:
    from oal_trainer.sweep import SWEEP_FILE
    from oal_trainer.sweep_report import is_sweep_dir

    rows = []
    for path in paths:
        if is_sweep_dir(path):
            record = json.loads((path / SWEEP_FILE).read_text(encoding="utf-8"))
            cells: dict[str, list[Path]] = {}
            for run in record["runs"]:
                run_dir = path / run["cell"] / f"seed-{run['seed']}"
                if (run_dir / METRICS_FILE).is_file():
                    cells.setdefault(run["cell"], []).append(run_dir)
            if not cells:
                raise RunMetricsMissingError(f"sweep {path}: no finished run holds a {METRICS_FILE}")
            for cell, run_dirs in cells.items():
                rows.append(_row_from_runs([(cell, d) for d in run_dirs], scorer, f"{path}/{cell}"))
        else:
            rows.append(_row_from_runs([(_recipe(path), path)], scorer, str(path)))
    return rows


def _published_rows(benchmarks: Sequence[str]) -> list[CompareRow]:
    return [
        CompareRow(
            origin="published",
            benchmark=row.benchmark,
            training=row.training
            + (" (+ real outliers)" if row.outlier_data else "")
            + (f" ({row.note})" if row.note != "100 epochs" else ""),
            score=row.postprocessor,
            near_auroc=row.near_auroc,
            far_auroc=row.far_auroc,
            id_accuracy=row.id_accuracy,
            seeds=3,
            source=row.source,
        )
        for row in PUBLISHED
        if row.benchmark in benchmarks
    ]


def _cell(value: Measure | None) -> str:
    return "n/a" if value is None else value.text()


def _markdown(rows: Sequence[CompareRow], scorer: str, benchmarks: Sequence[str]) -> str:
    ours = [row for row in rows if row.origin == "run here"]
    lines = [
        f"# Our runs beside published results ({scorer} score for ours)",
        "",
        "| origin | benchmark | comparable | training | score | near AUROC | far AUROC | ID acc | seeds | source |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        origin = f"**{row.origin}**" if row.origin == "run here" else row.origin
        lines.append(
            f"| {origin} | {row.benchmark} | {row.comparable} | {row.training} | {row.score} | "
            f"{_cell(row.near_auroc)} | {_cell(row.far_auroc)} | {_cell(row.id_accuracy)} | "
            f"{row.seeds if row.seeds is not None else '-'} | {row.source} |"
        )
    lines += ["", "Values in %: mean ± standard deviation over seeds (a single run: its value)."]
    incomparable = sorted({row.benchmark for row in ours if row.benchmark not in PUBLISHED_BENCHMARKS})
    if incomparable:
        lines.append(
            f"Rows run here on {', '.join(incomparable)} are NOT comparable with the published rows: those "
            "are CIFAR-10/100 with OpenOOD v1.5's near/far sets and ResNet-18; the embedded benchmark has other "
            "ID images, other OOD sets and smaller models. Read them against each other, not against CIFAR."
        )
    lines += [
        "Published rows: ResNet-18, OpenOOD v1.5 splits, three training seeds; their score is the one OpenOOD "
        "reports for that training method, which is not always ours (OE and NPOS are reported with MSP and KNN).",
        "",
        "Sources:",
        "",
    ]
    lines += [f"- {benchmark}: {SOURCE_URLS[benchmark]}" for benchmark in benchmarks]
    lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[CompareRow]) -> Path:
    def number(value: Measure | None) -> str:
        return "" if value is None else f"{value.mean:.2f}"

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    row.origin,
                    row.benchmark,
                    row.comparable,
                    row.training,
                    row.score,
                    number(row.near_auroc),
                    number(row.far_auroc),
                    number(row.id_accuracy),
                    row.seeds or "",
                    row.source,
                ]
            )
    return path


def build_comparison(
    paths: Sequence[Path],
    out_dir: Path | None = None,
    *,
    scorer: str = DEFAULT_SCORER,
    benchmarks: Sequence[str] = PUBLISHED_BENCHMARKS,
) -> Comparison:
    """Our runs (run dirs or sweep folders) first, then the published rows of `benchmarks`."""
    if not paths:
        raise ConfigError("compare: name at least one run dir or sweep folder")
    unknown = sorted(set(benchmarks) - set(PUBLISHED_BENCHMARKS))
    if unknown:
        raise ConfigError(f"--benchmark: no published rows for {unknown}; there are {list(PUBLISHED_BENCHMARKS)}")
    rows = (*_our_rows([Path(p) for p in paths], scorer), *_published_rows(benchmarks))
    markdown = _markdown(rows, scorer, benchmarks)
    written: dict[str, Path] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written["markdown"] = out_dir / COMPARE_MARKDOWN
        written["markdown"].write_text(markdown, encoding="utf-8")
        written["csv"] = _write_csv(out_dir / COMPARE_CSV, rows)
    return Comparison(rows, markdown, written)
