"""Sweeps: the file is validated up front; runs follow their dependencies; a killed sweep resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oal_shared.errors import ConfigError
from oal_trainer.sweep import run_sweep
from oal_trainer.sweep_report import build_sweep_report
from oal_trainer.sweep_spec import read_sweep_file, resolve_runs

TINY = "set = { train_subset = 96, eval_subset = 48, batch_size = 32, log_interval = 1 }"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_cells_expand_and_reference_runs_of_the_same_seed(tmp_path):
    sweep = _write(
        tmp_path / "s.toml",
        f"""
preset = "smoke"
seeds = [0, 1]
{TINY}
[cells.ce]
recipe = "ce"
[cells.ft]
recipe = "kd"
init = "ce"
teacher = "ce"
teacher_seed = 0
vary = {{ w_logit_kd = [1.0, 4.0] }}
""",
    )
    runs = resolve_runs(read_sweep_file(sweep), tmp_path / "out")
    keys = [run.key for run in runs]
    assert ("ft-w_logit_kd1.0", 1) in keys and ("ft-w_logit_kd4.0", 0) in keys and len(keys) == 6
    by_key = {run.key: run for run in runs}
    ft = by_key[("ft-w_logit_kd4.0", 1)]
    assert ft.config.w_logit_kd == 4.0 and ft.config.seed == 1 and ft.config.train_subset == 96
    assert ft.config.init_from == str(tmp_path / "out" / "ce" / "seed-1")  # same seed
    assert ft.config.teacher_run == str(tmp_path / "out" / "ce" / "seed-0")  # pinned
    assert keys.index(("ce", 1)) < keys.index(("ft-w_logit_kd4.0", 1))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('seeds = [0]\n[cells.a]\nrecipe = "cee"', "cells.a.recipe: unknown recipe 'cee'"),
        ('seeds = [0, 0]\n[cells.a]\nrecipe = "ce"', "seeds: seeds must be distinct"),
        ('seeds = [0]\n[cells.a]\nrecipe = "kd"\ninit = "nope"', "cells.a.init: no cell named 'nope'"),
        ('seeds = [0]\n[cells.a]\nrecipe = "ce"\nset = { seed = 3 }', "cells.a: seed is set by the sweep"),
        ('seeds = [0]\n[cells.a]\nrecipe = "ce"\nset = { lr = -1 }', "cells.a: lr: Input should be greater than 0"),
        ('seeds = [0]\n[cells.a]\nrecipe = "ce"\nset = { lrr = 1 }', "cells.a: unknown config key 'lrr'"),
        (
            'seeds = [1]\n[cells.a]\nrecipe = "ce"\nseeds = [0]\n[cells.b]\nrecipe = "kd"\ninit = "a"',
            "cells.b.init: cell 'a' has no run with seed 1",
        ),
        ("seeds = [0]\ncells = {}", "cells"),
        ('seeds = [0]\n[cells.a]\nrecipe = "kd"', "cells.a: teacher_run: required when w_logit_kd"),
        ("seeds = [0", "not valid TOML"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, body, words):
    path = _write(tmp_path / "bad.toml", body)
    with pytest.raises(ConfigError) as info:
        run_sweep(path, tmp_path / "out")
    assert words in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "out").exists(), "nothing runs, nothing is written, before the file is valid"


def test_a_cycle_is_refused(tmp_path):
    path = _write(
        tmp_path / "c.toml", 'seeds = [0]\n[cells.a]\nrecipe = "ce"\ninit = "b"\n[cells.b]\nrecipe = "ce"\ninit = "a"'
    )
    with pytest.raises(ConfigError, match="cycle"):
        resolve_runs(read_sweep_file(path), tmp_path / "out")


def _completions(log: Path) -> int:
    return log.read_text(encoding="utf-8", errors="replace").count("run dir: ")


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_runs_every_cell_exactly_once(tmp_path):
    out = tmp_path / "sweep"
    sweep = _write(
        tmp_path / "s.toml",
        f"""
preset = "smoke"
seeds = [0, 1]
{TINY}
[cells.ce]
recipe = "ce"
set = {{ epochs = 3 }}
[cells.ft]
recipe = "ce"
init = "ce"
set = {{ lr = 0.005, augment = false }}
""",
    )
    argv = [sys.executable, "-m", "oal_trainer.cli", "sweep", str(sweep), "--out", str(out), "--lanes", "1"]
    sweep_process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill the sweep (SIGKILL, no clean-up) once the first run is finished and the second has an
    # epoch checkpoint but no model yet: a finished run, a half-done run and untouched runs.
    first, second = out / "ce" / "seed-0", out / "ce" / "seed-1"
    deadline = time.monotonic() + 240
    while not ((first / "model.safetensors").exists() and (second / "checkpoints" / "last.safetensors").exists()):
        assert sweep_process.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.05)
    os.kill(sweep_process.pid, signal.SIGKILL)
    sweep_process.wait()
    time.sleep(1.0)  # the fit child gets SIGTERM through PR_SET_PDEATHSIG
    assert not (second / "model.safetensors").exists(), "the killed run must not have finished"
    finished_mtime = (first / "model.safetensors").stat().st_mtime_ns

    result = run_sweep(sweep, out, lanes=2)
    assert not result.failed
    assert result.states[("ce", 0)] == "skipped"
    assert {result.states[key] for key in [("ce", 1), ("ft", 0), ("ft", 1)]} == {"done"}
    assert (first / "model.safetensors").stat().st_mtime_ns == finished_mtime, "a finished run was re-run"
    for cell, seed in [("ce", 0), ("ce", 1), ("ft", 0), ("ft", 1)]:
        assert _completions(out / cell / f"seed-{seed}.log") == 1, f"{cell}/seed-{seed} finished more than once"
        assert (out / cell / f"seed-{seed}" / "metrics.json").is_file()
    assert "Resuming" in (out / "ce" / "seed-1.log").read_text(encoding="utf-8")
    assert run_sweep(sweep, out).states == {key: "skipped" for key in result.states}

    report = build_sweep_report(out, ["ce"])
    assert {cell.name for cell in report.cells} == {"ce", "ft"}
    assert report.differences["ce"]["ft"]["id_accuracy"].n == 2
    assert (out / "sweep_report.md").is_file() and (out / "sweep_report.png").stat().st_size > 0
    header = (out / "sweep_results.csv").read_text().splitlines()[0]
    assert header.startswith("cell,dataset,FPR@95,AUROC,AUPR_IN,AUPR_OUT,ACC,seeds")
    elsewhere = build_sweep_report(out, ["ce"], out_dir=tmp_path / "report")
    assert set(elsewhere.paths.values()) == {
        tmp_path / "report" / name for name in ("sweep_report.md", "sweep_results.csv", "sweep_report.png")
    }
    only_ft = build_sweep_report(out, [], out_dir=tmp_path / "only", only=["ft"])
    assert [cell.name for cell in only_ft.cells] == ["ft"]
    assert not any(line.startswith("| ce |") for line in only_ft.markdown.splitlines())
    with pytest.raises(ConfigError, match="--cell nope: no such cell"):
        build_sweep_report(out, [], write=False, only=["nope"])


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path):
    from oal_trainer.sweep import _lock_sweep_folder

    tmp_path.mkdir(exist_ok=True)
    held = _lock_sweep_folder(tmp_path)
    try:
        with pytest.raises(ConfigError, match="another `oal-train sweep` is running"):
            _lock_sweep_folder(tmp_path)
    finally:
        held.close()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "benchmarks" / "sweeps").glob("*.toml")))
def test_the_committed_sweep_files_resolve(path, tmp_path):
    runs = resolve_runs(read_sweep_file(path), tmp_path)
    assert runs and all(run.config.seed in (read_sweep_file(path).seeds + [0]) for run in runs)
