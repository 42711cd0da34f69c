"""`oal-train compare`: our runs (real evaluation outputs) beside the published OpenOOD v1.5 rows, every
published row citing its file, and the table saying which rows were run here and whether they compare."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oal_shared.errors import ConfigError
from oal_trainer.compare import COMPARE_CSV, COMPARE_MARKDOWN, build_comparison
from oal_trainer.evaluate import evaluate_model
from oal_trainer.evaluate_outputs import write_eval_outputs
from oal_trainer.published import OPENOOD_COMMIT, PUBLISHED
from tests.trainer.test_cli import invoke
from tests.trainer.test_evaluate import TinyNet, benchmark  # noqa: F401  (fixture)


def _run(root: Path, name: str, bench, seed: int) -> tuple[Path, dict]:
    """A run dir holding what `fit` writes for evaluation: metrics.json and friends, config.json."""
    torch.manual_seed(seed)
    run_dir = root / name
    write_eval_outputs(run_dir, evaluate_model(TinyNet(), bench))
    (run_dir / "config.json").write_text(json.dumps({"recipe": "oal", "seed": seed}))
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_a_run_on_the_embedded_benchmark_is_marked_not_comparable(benchmark, tmp_path):  # noqa: F811
    run_dir, metrics = _run(tmp_path, "oal", replace(benchmark, name="fmnist-osr"), 0)
    result = build_comparison([run_dir], tmp_path / "out")
    ours, *published = result.rows
    assert ours.origin == "run here" and ours.benchmark == "fmnist-osr" and ours.training == "oal"
    assert ours.near_auroc.mean == pytest.approx(100 * metrics["scores"]["energy"]["near"]["auroc"])
    assert ours.far_auroc.mean == pytest.approx(100 * metrics["scores"]["energy"]["far"]["auroc"])
    assert ours.id_accuracy.mean == pytest.approx(100 * metrics["id_accuracy"]) and ours.id_accuracy.std is None
    assert ours.comparable.startswith("no")
    assert "NOT comparable" in result.markdown and "fmnist-osr" in result.markdown
    assert {row.training.split(" ")[0] for row in published} == {"CrossEntropy", "OAL", "OE", "VOS", "NPOS"}
    assert {row.benchmark for row in published} == {"cifar10", "cifar100"}
    assert all(row.origin == "published" and OPENOOD_COMMIT[:7] in row.source for row in published)
    assert f"blob/{OPENOOD_COMMIT}/results/cifar10.csv" in result.markdown
    with open(tmp_path / "out" / COMPARE_CSV, newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(result.rows) and lines[0]["origin"] == "run here"
    assert (tmp_path / "out" / COMPARE_MARKDOWN).read_text() == result.markdown


def test_a_cifar_run_is_comparable_with_the_rows_of_its_benchmark(benchmark, tmp_path):  # noqa: F811
    run_dir, _ = _run(tmp_path, "ce", replace(benchmark, name="cifar10"), 0)
    result = build_comparison([run_dir], benchmarks=("cifar10",))
    assert result.rows[0].comparable == "yes, with the cifar10 rows"
    assert "NOT comparable" not in result.markdown
    assert {row.benchmark for row in result.rows} == {"cifar10"}


def test_a_sweep_cell_is_one_row_with_the_mean_and_std_over_its_seeds(benchmark, tmp_path):  # noqa: F811
    sweep = tmp_path / "sweep"
    bench = replace(benchmark, name="fmnist-osr")
    values = [_run(sweep / "oal", f"seed-{seed}", bench, seed)[1] for seed in (0, 1)]
    runs = [{"cell": "oal", "seed": seed} for seed in (0, 1)]
    (sweep / "sweep.json").write_text(json.dumps({"spec": {}, "runs": runs}))
    row = build_comparison([sweep]).rows[0]
    near = [100 * m["scores"]["energy"]["near"]["auroc"] for m in values]
    assert row.seeds == 2 and row.training == "oal"
    assert row.near_auroc.mean == pytest.approx(statistics.fmean(near))
    assert row.near_auroc.std == pytest.approx(statistics.stdev(near))


def test_published_rows_keep_the_reference_baseline_and_cite_a_file_each():
    ce100 = next(r for r in PUBLISHED if r.benchmark == "cifar100" and r.training == "CrossEntropy")
    assert (ce100.near_auroc.mean, ce100.far_auroc.mean, ce100.id_accuracy.mean) == (80.91, 79.77, 77.25)
    assert len({(r.benchmark, r.training) for r in PUBLISHED}) == len(PUBLISHED)
    for row in PUBLISHED:
        assert row.url.endswith(f"/{OPENOOD_COMMIT}/results/{row.benchmark}.csv")


def test_the_cli_writes_the_comparison_and_refuses_what_it_cannot_show(benchmark, tmp_path):  # noqa: F811
    run_dir, _ = _run(tmp_path, "oal", replace(benchmark, name="fmnist-osr"), 0)
    result = invoke("compare", run_dir, "--out", tmp_path / "cmp", "--benchmark", "cifar100")
    assert result.exit_code == 0, result.output
    assert "run here" in result.output and "cifar100" in result.output
    assert (tmp_path / "cmp" / COMPARE_MARKDOWN).is_file()
    result = invoke("compare", run_dir, "--benchmark", "imagenet")
    assert result.exit_code == 2 and "imagenet" in result.output
    result = invoke("compare", run_dir, "--scorer", "vim")
    assert result.exit_code == 1 and "scorer 'vim' not in metrics.json" in result.output
    with pytest.raises(ConfigError, match="at least one"):
        build_comparison([])
