"""Trainer step rate: outliers streamed from WebDataset shards vs held in memory vs `auto`.

Every run trains the same `oal` config (same seed, same ID batches) for the same number of steps;
only `outlier_source` differs (memory and stream draw different outliers from the same job, at the
same cost per step). The rate is ID samples per second over all steps after a warm-up, measured
between consecutive optimiser steps, so it includes fetching and decoding the outliers. Threads are
the defaults (torch's, unless --threads) and the stream reads where the config puts it by default
(in the training process on the CPU), unless --outlier-workers.

On a busy machine absolute rates drift, so the sources run in interleaved rounds (memory, stream,
auto, memory, ...) and the result is the median of the per-round ratios. Target: stream / memory
>= 0.95. `auto` records which source it chose (run.json) and that is printed. Next to the rate,
the CPU seconds each step took in all processes (training threads plus the reader worker): memory
CPU / stream CPU is what the rate ratio tends to on two cores that do nothing else.

    .venv/bin/python benchmarks/bench_trainer_stream.py --teacher runs/demo/teacher \
        --shards runs/demo/shards/<job-id> --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from oal_trainer.fit import FitHooks, StepInfo, fit
from oal_trainer.recipes import resolve_config

WARMUP_STEPS = 5
SOURCES = ("memory", "stream", "auto")


def measure(source: str, args: argparse.Namespace) -> dict:
    batch = args.batch_size
    overrides = [
        f"teacher_run={args.teacher}",
        f"shards={args.shards}",
        f"outlier_source={source}",
        f"train_subset={batch * (args.steps + 1)}",
        f"batch_size={batch}",
        "evaluate=false",
    ]
    if args.threads:
        overrides.append(f"threads={args.threads}")
    if args.outlier_workers is not None:
        overrides.append(f"outlier_workers={args.outlier_workers}")
    config = resolve_config("oal", "demo", overrides=overrides)
    step_times: list[float] = []
    last = [time.perf_counter()]
    cpu = {"start": 0.0, "end": 0.0}

    def on_step(_: StepInfo) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        cpu["end"] = time.process_time()

    def on_start(_: int, __: int) -> None:
        last[0] = time.perf_counter()
        cpu["start"] = time.process_time()

    children_before = _children_cpu()
    with tempfile.TemporaryDirectory() as run_dir:
        out = Path(run_dir) / source
        fit(config, out, hooks=FitHooks(on_start=on_start, on_step=on_step))
        chosen = json.loads((out / "run.json").read_text())["outliers"]["source"]
    timed = step_times[WARMUP_STEPS:]
    # CPU seconds per step, the training process (all threads) plus its outlier reader worker (a child
    # that has exited by now): unlike the wall rate, this barely moves with other processes' load.
    cpu_s = cpu["end"] - cpu["start"] + _children_cpu() - children_before
    return {
        "chosen": chosen,
        "steps": len(timed),
        "samples_per_s": batch * len(timed) / sum(timed),
        "median_step_ms": 1000 * statistics.median(timed),
        "cpu_ms_per_step": 1000 * cpu_s / len(step_times),
        "load_average": os.getloadavg()[0],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="a `ce` run directory (the teacher)")
    parser.add_argument("--shards", type=Path, required=True, help="a job's shard folder")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the default")
    parser.add_argument("--outlier-workers", type=int, help="reader processes of the stream; default: the config's")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    rounds = []
    for _ in range(args.rounds):
        rounds.append({source: measure(source, args) for source in SOURCES})
    ratios = {
        source: statistics.median(r[source]["samples_per_s"] / r["memory"]["samples_per_s"] for r in rounds)
        for source in ("stream", "auto")
    }
    cpu_ratios = {
        source: statistics.median(r["memory"]["cpu_ms_per_step"] / r[source]["cpu_ms_per_step"] for r in rounds)
        for source in ("stream", "auto")
    }
    threads = args.threads or "default"
    table = Table(title=f"oal training step rate, batch {args.batch_size}, threads {threads}, {args.rounds} rounds")
    columns = (
        "outlier_source",
        "chosen",
        "ID samples/s per round",
        "rate / memory",
        "CPU ms/step",
        "memory CPU / this",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for source in SOURCES:
        rates = " ".join(f"{r[source]['samples_per_s']:.0f}" for r in rounds)
        cpu = statistics.median(r[source]["cpu_ms_per_step"] for r in rounds)
        ratio = f"{ratios[source]:.3f}" if source in ratios else "1"
        cpu_ratio = f"{cpu_ratios[source]:.3f}" if source in cpu_ratios else "1"
        table.add_row(source, rounds[0][source]["chosen"], rates, ratio, f"{cpu:.0f}", cpu_ratio)
    loads = [r[s]["load_average"] for r in rounds for s in SOURCES]
    table.caption = (
        f"median of per-round ratios (target stream / memory >= 0.95); load average {min(loads):.1f}-{max(loads):.1f}"
    )
    Console().print(table)
    if args.json:
        result = {"rounds": rounds, "ratios": ratios, "cpu_ratios": cpu_ratios, "threads": threads}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
