"""`oal-train sweep FILE`: run a grid of training runs into one folder, in parallel lanes, resumably.

    OUT/
      sweep.json                  the sweep file as resolved (every run's config), rewritten each start
      <cell>/seed-<s>/            one run dir per (cell, seed), as `oal-train fit --out` makes it
      <cell>/seed-<s>.config.json the config the run was started with
      <cell>/seed-<s>.log         its stdout and stderr

One sweep at a time per folder (a lock file, `.sweep.lock`). Each run is an `oal-train fit`
process with one torch thread per lane: on two cores, two one-thread processes beat one
two-thread process (docs/BENCHMARKS.md). A finished run (model and metrics written) is skipped
on the next start; a killed one resumes from its last epoch checkpoint,
because `fit` resumes a run dir that holds a checkpoint. A run whose dependency failed is not
started and is reported as blocked. The fit processes share the sweep's process group (Ctrl-C
stops them all) and, on Linux, die with the sweep even when it is killed with SIGKILL, so a
re-run never finds an orphan still writing into a run dir.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from oal_shared.errors import ConfigError
from oal_trainer.recipes import RUNTIME_FIELDS, TrainConfig
from oal_trainer.sweep_spec import SweepRun, SweepSpec, read_sweep_file, resolve_runs

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "config.json"
#: Seconds between looks at the running processes.
POLL_INTERVAL_S = 0.5

RunState = Literal["done", "skipped", "failed", "blocked"]


@dataclass
class SweepResult:
    out: Path
    states: dict[tuple[str, int], RunState] = field(default_factory=dict)

    @property
    def failed(self) -> list[tuple[str, int]]:
        return [key for key, state in self.states.items() if state in ("failed", "blocked")]


def is_finished(run: SweepRun, out: Path) -> bool:
    """A run is finished when its model (and, if it evaluates, its metrics) are written."""
    run_dir = run.run_dir(out)
    return (run_dir / MODEL_FILE).is_file() and (not run.config.evaluate or (run_dir / METRICS_FILE).is_file())


def check_recorded_config(run: SweepRun, out: Path) -> None:
    """A run dir started from another config belongs to another sweep: refuse to mix them."""
    recorded_path = run.run_dir(out) / RUN_CONFIG_FILE
    if not recorded_path.is_file():
        return
    recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
    wanted = run.config.model_dump(mode="json")
    differs = sorted(
        key
        for key in wanted.keys() | recorded.keys()
        if key not in RUNTIME_FIELDS and wanted.get(key) != recorded.get(key)
    )
    if differs:
        raise ConfigError(
            f"{run.run_dir(out)}: this run dir was made with other values of {', '.join(differs)}; "
            "delete it, or give the changed cell a new name"
        )


def _lane_config(config: TrainConfig, threads: int) -> TrainConfig:
    return config.model_copy(update={"threads": threads})


def _fit_command(run: SweepRun, config_path: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "oal_trainer.cli",
        "fit",
        "--recipe",
        run.config.recipe,
        "--config",
        str(config_path),
        "--out",
        str(run.run_dir(out)),
        "--no-progress",
    ]


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["OAL_TORCH_THREADS"] = str(threads)
    return env


def write_sweep_record(spec: SweepSpec, runs: list[SweepRun], out: Path) -> Path:
    record = {
        "spec": spec.model_dump(mode="json"),
        "runs": [
            {
                "cell": run.cell,
                "seed": run.seed,
                "needs": [list(need) for need in run.needs],
                "config": run.config.model_dump(mode="json"),
            }
            for run in runs
        ],
    }
    path = out / SWEEP_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the sweep process dies."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _lock_sweep_folder(out: Path):
    """Hold an exclusive lock on OUT/.sweep.lock for the sweep's lifetime (released when it exits)."""
    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise ConfigError(
            f"{out}: another `oal-train sweep` is running into this folder; wait for it or stop it"
        ) from exc
    return handle


class _Lanes:
    """Up to `lanes` fit processes at once; each run starts once every run it needs has finished."""

    def __init__(self, runs: list[SweepRun], out: Path, lanes: int, threads: int, result: SweepResult):
        self.pending = list(runs)
        self.out = out
        self.lanes = lanes
        self.threads = threads
        self.result = result
        self.running: dict[tuple[str, int], tuple[subprocess.Popen, object]] = {}

    def _ready(self, run: SweepRun) -> bool:
        return all(self.result.states.get(need) in ("done", "skipped") for need in run.needs)

    def _blocked(self, run: SweepRun) -> bool:
        return any(self.result.states.get(need) in ("failed", "blocked") for need in run.needs)

    def start_what_fits(self) -> None:
        for run in list(self.pending):
            if self._blocked(run):
                self.pending.remove(run)
                self.result.states[run.key] = "blocked"
                logger.error("Sweep: %s/seed-%d not started: a run it needs failed", run.cell, run.seed)
            elif len(self.running) < self.lanes and self._ready(run):
                self.pending.remove(run)
                self._start(run)

    def _start(self, run: SweepRun) -> None:
        cell_dir = self.out / run.cell
        cell_dir.mkdir(parents=True, exist_ok=True)
        config_path = cell_dir / f"seed-{run.seed}.config.json"
        config_path.write_text(
            json.dumps(_lane_config(run.config, self.threads).model_dump(mode="json"), indent=2) + "\n",
            encoding="utf-8",
        )
        log = open(cell_dir / f"seed-{run.seed}.log", "ab")  # noqa: SIM115 - closed when the process ends
        process = subprocess.Popen(
            _fit_command(run, config_path, self.out),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_thread_env(self.threads),
            preexec_fn=_die_with_parent,
        )
        self.running[run.key] = (process, log)
        logger.info("Sweep: started %s/seed-%d (pid %d)", run.cell, run.seed, process.pid)

    def reap(self) -> list[tuple[str, int]]:
        ended = []
        for key, (process, log) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            log.close()
            del self.running[key]
            self.result.states[key] = "done" if code == 0 else "failed"
            if code != 0:
                logger.error(
                    "Sweep: %s/seed-%d failed (exit %d); see %s",
                    key[0],
                    key[1],
                    code,
                    self.out / key[0] / f"seed-{key[1]}.log",
                )
            ended.append(key)
        return ended

    def stop_all(self) -> None:
        for process, _log in self.running.values():
            process.terminate()
        for process, log in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        self.running.clear()

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.running)


def run_sweep(
    sweep_file: Path, out: Path, *, lanes: int = 2, threads: int = 1, console: Console | None = None
) -> SweepResult:
    """Run every unfinished run of the sweep file into `out`; see the module docstring."""
    if lanes < 1 or threads < 1:
        raise ConfigError(f"lanes and threads must be at least 1, got lanes={lanes}, threads={threads}")
    spec = read_sweep_file(sweep_file)
    out = Path(out).resolve()
    try:
        runs = resolve_runs(spec, out)
    except ConfigError as exc:
        raise ConfigError(f"sweep file {sweep_file}: {exc}") from exc
    for run in runs:
        check_recorded_config(run, out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_sweep_folder(out)
    try:
        return _run_locked(spec, runs, out, lanes, threads, console)
    finally:
        lock.close()


def _run_locked(
    spec: SweepSpec, runs: list[SweepRun], out: Path, lanes: int, threads: int, console: Console | None
) -> SweepResult:
    write_sweep_record(spec, runs, out)
    result = SweepResult(out=out)
    todo = []
    for run in runs:
        if is_finished(run, out):
            result.states[run.key] = "skipped"
        else:
            todo.append(run)
    logger.info("Sweep %s: %d runs, %d finished before, %d to run", out, len(runs), len(runs) - len(todo), len(todo))
    lanes_ = _Lanes(todo, out, lanes, threads, result)
    columns = (
        TextColumn("[bold]sweep[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        task = progress.add_task("", total=len(runs), completed=len(runs) - len(todo))
        try:
            while lanes_.busy:
                lanes_.start_what_fits()
                progress.update(task, description="running: " + ", ".join(f"{c}/seed-{s}" for c, s in lanes_.running))
                time.sleep(POLL_INTERVAL_S)
                progress.advance(task, len(lanes_.reap()))
        finally:
            lanes_.stop_all()
        progress.update(task, description="")
    return result
