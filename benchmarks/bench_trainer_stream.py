"""Trainer step rate: outliers streamed from WebDataset shards vs the same outliers held in memory.

Both runs train the same `oal` config (same seed, same ID batches, same outliers) for the same
number of steps; only `outlier_source` differs. The rate is ID samples per second over all steps
after a warm-up, measured between consecutive optimiser steps, so it includes fetching and
decoding the outliers. Target: stream / memory >= 0.95.

    .venv/bin/python benchmarks/bench_trainer_stream.py --teacher runs/demo/teacher \
        --shards runs/demo/shards/<job-id> --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from oal_trainer.fit import FitHooks, StepInfo, fit
from oal_trainer.recipes import resolve_config

WARMUP_STEPS = 5


def measure(source: str, args: argparse.Namespace) -> dict[str, float]:
    batch = args.batch_size
    config = resolve_config(
        "oal",
        "demo",
        overrides=[
            f"teacher_run={args.teacher}",
            f"shards={args.shards}",
            f"outlier_source={source}",
            f"train_subset={batch * (args.steps + 1)}",
            f"batch_size={batch}",
            "evaluate=false",
            f"threads={args.threads}",
        ],
    )
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(_: StepInfo) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    def on_start(_: int, __: int) -> None:
        last[0] = time.perf_counter()

    with tempfile.TemporaryDirectory() as run_dir:
        fit(config, Path(run_dir) / source, hooks=FitHooks(on_start=on_start, on_step=on_step))
    timed = step_times[WARMUP_STEPS:]
    return {
        "steps": len(timed),
        "samples_per_s": batch * len(timed) / sum(timed),
        "median_step_ms": 1000 * statistics.median(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="a `ce` run directory (the teacher)")
    parser.add_argument("--shards", type=Path, required=True, help="a job's shard folder")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    results = {source: measure(source, args) for source in ("memory", "stream")}
    ratio = results["stream"]["samples_per_s"] / results["memory"]["samples_per_s"]
    table = Table(title=f"oal training step rate, batch {args.batch_size}, {args.threads} threads")
    for column in ("outliers from", "steps timed", "ID samples/s", "median step (ms)"):
        table.add_column(column, justify="right")
    for source, row in results.items():
        table.add_row(source, str(row["steps"]), f"{row['samples_per_s']:.0f}", f"{row['median_step_ms']:.0f}")
    table.caption = f"stream / memory = {ratio:.3f} (target >= 0.95)"
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
