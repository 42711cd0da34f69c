"""build_report on two fake run directories: table contents, best marks, files, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oal_trainer.evaluate import EvalResult, SetScores
from oal_trainer.metrics import AUROC, FPR95_OOD_POSITIVE
from oal_trainer.report import ReportInputError, RunMetricsMissingError, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_result(id_correct: int, near_shift: float, far_shift: float, seed: int) -> EvalResult:
    """Scores drawn so that larger shifts separate ID from OOD better; `id_correct` of 20 preds right."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(20, dtype=np.int64)
    preds = np.where(np.arange(20) < id_correct, 0, 1).astype(np.int64)

    def ood(name: str, kind: str, shift: float) -> SetScores:
        labels = np.full(30, -1, dtype=np.int64)
        return SetScores(
            name, kind, labels, np.zeros(30, dtype=np.int64), {"energy": rng.normal(-shift, 1, 30)}
        )

    return EvalResult(
        benchmark="fake",
        scorer_names=("energy",),
        id_set=SetScores("fake-id", "id", labels, preds, {"energy": rng.normal(0.0, 1.0, 20)}),
        ood_sets=(ood("near-1", "near", near_shift), ood("far-1", "far", far_shift)),
    )


def _write_run(run_dir: Path, result: EvalResult, recipe: object | None) -> dict:
    run_dir.mkdir(parents=True)
    metrics = result.metrics()
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if recipe is not None:
        (run_dir / "config.json").write_text(json.dumps({"recipe": recipe, "epochs": 1}))
    return metrics


def _markdown_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, {run label: row cells}) of the report's one table."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header, _rule, *body = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return header, {cells[0]: cells for cells in body}


def test_report_on_two_runs_marks_the_best_per_column(tmp_path: Path):
    # Run "oal" separates near-OOD better; run "baseline" has the higher ID accuracy.
    oal_result = _fake_result(15, near_shift=3.0, far_shift=2.0, seed=1)
    base_result = _fake_result(18, near_shift=0.5, far_shift=2.0, seed=2)
    oal = _write_run(tmp_path / "oal", oal_result, recipe={"name": "oal"})
    base = _write_run(tmp_path / "baseline", base_result, recipe="ce")
    report = build_report([tmp_path / "oal", tmp_path / "baseline"], tmp_path / "report")

    assert [run.label for run in report.runs] == ["oal", "baseline"]
    assert [run.recipe for run in report.runs] == ["oal", "ce"]
    header, rows = _markdown_table(report.markdown)
    acc, near_auroc = header.index("ID acc"), header.index("near AUROC")
    near_fpr = header.index("near FPR@95 OOD+")
    assert rows["baseline"][acc] == f"**{100 * base['id_accuracy']:.2f}**"
    assert rows["oal"][acc] == f"{100 * oal['id_accuracy']:.2f}"
    oal_near, base_near = oal["scores"]["energy"]["near"], base["scores"]["energy"]["near"]
    assert oal_near[AUROC] > base_near[AUROC]
    assert rows["oal"][near_auroc] == f"**{100 * oal_near[AUROC]:.2f}**"
    assert rows["baseline"][near_auroc] == f"{100 * base_near[AUROC]:.2f}"
    # Lower is better for FPR: the bold one is the minimum.
    best_fpr_run = "oal" if oal_near[FPR95_OOD_POSITIVE] <= base_near[FPR95_OOD_POSITIVE] else "baseline"
    assert rows[best_fpr_run][near_fpr].startswith("**")
    assert "FPR@95 ID+" in report.markdown and "Hendrycks" in report.markdown

    assert report.paths["markdown"].read_text() == report.markdown
    assert report.paths["markdown"].name == "report.md"
    assert report.paths["figure"].read_bytes()[:8] == PNG_SIGNATURE


def test_report_without_out_dir_writes_nothing_and_shows_missing_groups_as_na(tmp_path: Path):
    result = _fake_result(10, 1.0, 1.0, seed=3)
    far_only = EvalResult(result.benchmark, result.scorer_names, result.id_set, result.ood_sets[1:])
    _write_run(tmp_path / "far-only", far_only, recipe=None)
    report = build_report([tmp_path / "far-only"], None)
    assert report.paths == {}
    assert list(tmp_path.iterdir()) == [tmp_path / "far-only"]
    header, rows = _markdown_table(report.markdown)
    assert rows["far-only"][header.index("near AUROC")] == "n/a"
    assert rows["far-only"][header.index("recipe")] == "-"


def test_missing_metrics_names_the_run(tmp_path: Path):
    _write_run(tmp_path / "good", _fake_result(10, 1.0, 1.0, seed=4), recipe=None)
    (tmp_path / "never-evaluated").mkdir()
    with pytest.raises(RunMetricsMissingError, match="never-evaluated.*metrics.json"):
        build_report([tmp_path / "good", tmp_path / "never-evaluated"], tmp_path / "out")


def test_unknown_scorer_and_broken_json_name_the_run(tmp_path: Path):
    _write_run(tmp_path / "good", _fake_result(10, 1.0, 1.0, seed=5), recipe=None)
    with pytest.raises(ReportInputError, match="good.*scorer 'msp'"):
        build_report([tmp_path / "good"], None, scorer="msp")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    with pytest.raises(ReportInputError, match="broken.*metrics.json"):
        build_report([tmp_path / "broken"], None)
