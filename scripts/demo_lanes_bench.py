"""Are two one-thread trainings faster than one two-thread training, for the demo's models?

The same work both ways: one `oal-train fit` process with 2 torch threads training 2*S steps, or two
processes with 1 thread each training S steps side by side. The rounds are interleaved
(A, B, A, B, ...) so a change in the machine's load hits both; each round records the load average.

    .venv/bin/python scripts/demo_lanes_bench.py --out /tmp/h4/lanes --steps 100 --rounds 2 \
        --model resnet_wide                  # the demo's teacher; resnet_small: the students

Writes OUT/lanes.json (every round) and prints a table. Evaluation is off: only training is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

BIN = Path(sys.executable).parent
console = Console()


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OAL_TORCH_THREADS"):
        env[name] = str(threads)
    return env


def fit_argv(model: str, steps: int, batch: int, threads: int, out: Path) -> list[str]:
    sets = {
        "model": model,
        "train_subset": steps * batch,
        "epochs": 1,
        "evaluate": "false",
        "tensorboard": "false",
        "threads": threads,
        "log_interval": 1000,
    }
    argv = [str(BIN / "oal-train"), "fit", "--recipe", "ce", "--preset", "demo", "--out", str(out), "--no-progress"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def run_round(kind: str, args: argparse.Namespace, round_dir: Path) -> dict:
    """kind 'two-thread': one process, 2 threads, 2*S steps; 'one-thread-pair': two processes, 1 thread, S each."""
    shutil.rmtree(round_dir, ignore_errors=True)
    round_dir.mkdir(parents=True)
    if kind == "two-thread":
        jobs = [(fit_argv(args.model, 2 * args.steps, args.batch, 2, round_dir / "a"), thread_env(2))]
    else:
        jobs = [(fit_argv(args.model, args.steps, args.batch, 1, round_dir / n), thread_env(1)) for n in ("a", "b")]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for argv, env in jobs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{kind} round failed ({proc.returncode}):\n{err[-2000:]}")
    seconds = time.perf_counter() - started
    return {"kind": kind, "seconds": seconds, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="resnet_wide")
    parser.add_argument("--steps", type=int, default=100, help="S: steps of each one-thread process")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind, interleaved")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for i in range(args.rounds):
        for kind in ("two-thread", "one-thread-pair"):
            result = run_round(kind, args, args.out / f"round-{i}-{kind}")
            rounds.append({"round": i, **result})
            console.log(result)
            (args.out / "lanes.json").write_text(
                json.dumps({"args": vars(args) | {"out": str(args.out)}, "rounds": rounds}, indent=2)
            )
    table = Table("round", "kind", "seconds", "load before", "load after")
    for r in rounds:
        table.add_row(
            str(r["round"]), r["kind"], f"{r['seconds']:.1f}", f"{r['load_before']:.2f}", f"{r['load_after']:.2f}"
        )
    console.print(table)
    best = {kind: min(r["seconds"] for r in rounds if r["kind"] == kind) for kind in ("two-thread", "one-thread-pair")}
    console.print(f"two-thread / one-thread-pair (best of each): {best['two-thread'] / best['one-thread-pair']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
