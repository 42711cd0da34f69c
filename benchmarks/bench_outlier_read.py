"""Outlier read cost: the shard reader's microseconds per sample, and the trainer's stream at SD size.

Two measurements, JSON out (`--json`), a rich table on the terminal:

1. `--shards DIR` (a finished job) and `--baseline-rev REV`: three readers in interleaved rounds,
   so all see the same machine load, in microseconds of one process per sample: the per-sample
   pipeline (`outlier_pipeline`, resampled, shuffle buffer 1000, the manifest's layout checked) of
   git revision REV (its reader.py and schema.py loaded from `git show`) and of today, and the
   whole-shard block reader the trainer's sources use now (`read_shard_block`, every shard in turn).
2. `--sd N`: writes N Stable-Diffusion-sized samples (4x64x64 float16 latents, 768-d float32
   embeddings, 1000 per shard, the synthesis default) through the real shard writer and manifest
   into a temp folder, then times `OutlierStream` (128 per step, as the trainer uses it) with 0, 1
   and 2 DataLoader workers: outliers per second and MB/s of shard bytes, against the rate a
   training step demands (`--demand-steps-per-s`, steps per second x 128 outliers).

    .venv/bin/python benchmarks/bench_outlier_read.py --shards runs/demo/shards/<job> --baseline-rev a0f548d
    .venv/bin/python benchmarks/bench_outlier_read.py --sd 5000 --demand-steps-per-s 15.3 --json sd.json
    .venv/bin/python benchmarks/bench_outlier_read.py --sd 100000 --sd-dir /tmp/sd100k --steps 800 --workers 0,1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from oal_shared.shards import OutlierSample, load_manifest, outlier_pipeline, sample_key, write_manifest, write_shard
from oal_shared.shards.blocks import forget_shard_indexes, read_shard_block
from oal_trainer.data import OutlierStream

REPO = Path(__file__).resolve().parents[1]
SD_LATENT, SD_EMBED, SD_PER_SHARD = (4, 64, 64), 768, 1000
BATCH = 128


def load_baseline_reader(rev: str):
    """The reader module of git revision `rev`, with its own schema.py (policy.py is today's)."""
    folder = Path(tempfile.mkdtemp(prefix="oal-baseline-reader-"))
    sources = {}
    for name in ("schema", "reader"):
        text = subprocess.run(
            ["git", "show", f"{rev}:shared/oal_shared/shards/{name}.py"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        sources[name] = text.replace("from oal_shared.shards.schema import", "from oal_baseline_schema import")
        (folder / f"oal_baseline_{name}.py").write_text(sources[name])
    sys.path.insert(0, str(folder))
    modules = {}
    for name in ("schema", "reader"):
        spec = importlib.util.spec_from_file_location(f"oal_baseline_{name}", folder / f"oal_baseline_{name}.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        modules[name] = module
    return modules["reader"]


def read_cost_us(pipeline_fn, urls: list[str], layout, samples: int) -> float:
    """Microseconds per sample to read `samples` outliers the way OutlierStream's reader does."""
    pipeline = pipeline_fn(urls, resampled=True, epoch_length=samples, shuffle=1000, seed=1, layout=layout)
    start = time.perf_counter()
    count = sum(1 for _ in pipeline)
    return 1e6 * (time.perf_counter() - start) / count


def block_cost_us(manifest, samples: int) -> float:
    """Microseconds per sample to read whole shards, in turn, until `samples` are read."""
    count, start = 0, time.perf_counter()
    while count < samples:
        for path, info in zip(manifest.shard_paths, manifest.shards, strict=True):
            count += len(read_shard_block(path, info, manifest.layout))
    return 1e6 * (time.perf_counter() - start) / count


def compare_readers(shards: Path, rev: str, rounds: int, samples: int) -> dict:
    manifest = load_manifest(shards)
    urls = [str(path) for path in manifest.shard_paths]
    baseline = load_baseline_reader(rev)
    readers = {
        "baseline": lambda n: read_cost_us(baseline.outlier_pipeline, urls, manifest.layout, n),
        "per-sample": lambda n: read_cost_us(outlier_pipeline, urls, manifest.layout, n),
        "blocks": lambda n: block_cost_us(manifest, n),
    }
    for measure in readers.values():  # warm-up: imports, page cache, .npy header cache
        measure(min(samples, 500))
    per_round: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(rounds):
        for name, measure in readers.items():
            per_round[name].append(measure(samples))
    ratios = [b / c for b, c in zip(per_round["baseline"], per_round["blocks"], strict=True)]
    sample_bytes = sum(info.bytes for info in manifest.shards) / manifest.num_samples
    return {
        "shards": str(shards),
        "baseline_rev": rev,
        "samples_per_round": samples,
        "sample_kb_in_shard": round(sample_bytes / 1024, 2),
        "us_per_sample": {name: statistics.median(values) for name, values in per_round.items()},
        "per_round_us": per_round,
        "speedup_median_of_rounds": statistics.median(ratios),
    }


def write_sd_job(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    infos = []
    for shard, first in enumerate(range(0, count, SD_PER_SHARD)):
        samples = [
            OutlierSample(
                key=sample_key("sdbench", i % 10, i // 10, 0),
                latent=rng.standard_normal(SD_LATENT).astype(np.float16),
                embedding=rng.standard_normal(SD_EMBED).astype(np.float32),
                cls=i % 10,
                meta={"index": i, "guidance_scale": 7.5, "steps": 50, "scheduler": "ddim"},
            )
            for i in range(first, min(first + SD_PER_SHARD, count))
        ]
        infos.append(write_shard(folder, shard, samples))
    write_manifest(folder, {"num_outliers": count}, infos, generator={"id": "sd-bench", "content_hash": "0" * 64})
    return folder


def stream_rate(folder: Path, workers: int, steps: int) -> dict:
    """OutlierStream as the trainer drives it: outliers/s and MB/s of shard bytes over `steps` batches.

    Wall rates follow the machine's load; the CPU time the epoch took in every process (this one
    plus its DataLoader workers, which have exited when the epoch ends) does not, so the rate one
    core sustains (`outliers_per_cpu_s`) is the figure to hold against a trainer's demand.
    """
    forget_shard_indexes()  # every measurement starts cold: no shard's walk is known yet
    stream = OutlierStream(folder, batch_size=BATCH, steps_per_epoch=steps, seed=0, workers=workers)
    sample_bytes = sum(info.bytes for info in stream.manifest.shards) / stream.manifest.num_samples
    cpu_start = _cpu_seconds()
    batches = stream.epoch(0)
    next(batches)  # worker start-up and the first shard open are not the steady rate
    start = time.perf_counter()
    count = sum(len(batch) for batch in batches)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    return {
        "workers": workers,
        "outliers_per_s": count / seconds,
        "mb_per_s": count * sample_bytes / seconds / 2**20,
        "cpu_ms_per_batch": 1000 * cpu / steps,
        "outliers_per_cpu_s": steps * BATCH / cpu,
        "batches_timed": steps - 1,
    }


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (finished DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a finished job folder: read cost against --baseline-rev")
    parser.add_argument("--baseline-rev", default="a0f548d", help="git revision of the reader to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=3000, help="samples read per round")
    parser.add_argument("--sd", type=int, default=0, help="write this many SD-sized samples and time the stream")
    parser.add_argument("--sd-dir", type=Path, help="write the SD-sized job here and keep it (reused if it matches)")
    parser.add_argument("--steps", type=int, default=40, help="batches of 128 per stream measurement")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--demand-steps-per-s", type=float, default=0.0, help="training steps/s to compare with")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console()
    result: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}

    if args.shards:
        result["read_cost"] = compare_readers(args.shards, args.baseline_rev, args.rounds, args.samples)
        cost = result["read_cost"]
        table = Table(title=f"reader, µs per sample ({cost['sample_kb_in_shard']} KB in the shard)")
        for column in ("reader", "median µs/sample", "rounds"):
            table.add_column(column, justify="right")
        for name, value in cost["us_per_sample"].items():
            label = f"{name} ({args.baseline_rev})" if name == "baseline" else name
            rounds = " ".join(f"{v:.0f}" for v in cost["per_round_us"][name])
            table.add_row(label, f"{value:.1f}", rounds)
        table.caption = f"baseline / blocks, median of rounds: {cost['speedup_median_of_rounds']:.2f}x"
        console.print(table)

    if args.sd:
        with tempfile.TemporaryDirectory(prefix="oal-sd-outliers-") as tmp:
            folder = args.sd_dir or Path(tmp)
            start = time.perf_counter()
            reused = (folder / "manifest.json").exists() and load_manifest(folder).num_samples == args.sd
            if not reused:
                write_sd_job(folder, args.sd)
            manifest = load_manifest(folder)
            written = {
                "samples": manifest.num_samples,
                "shards": len(manifest.shards),
                "mb": sum(info.bytes for info in manifest.shards) / 2**20,
                "write_s": None if reused else time.perf_counter() - start,
            }
            rates = [stream_rate(folder, int(w), args.steps) for w in args.workers.split(",")]
        per_sample_mb = written["mb"] / written["samples"]
        demand = args.demand_steps_per_s * BATCH
        result["sd"] = {
            "written": written,
            "extrapolated_100k_gb": round(per_sample_mb * 100_000 / 1024, 2),
            "stream": rates,
            "demand": {"steps_per_s": args.demand_steps_per_s, "outliers_per_s": demand},
        }
        table = Table(title=f"SD-sized outliers: {written['samples']} x {per_sample_mb * 1024:.1f} KB, stream rate")
        for column in ("workers", "outliers/s", "MB/s", "CPU ms per batch", "outliers per CPU-s", "wall vs demand"):
            table.add_column(column, justify="right")
        for row in rates:
            versus = f"{row['outliers_per_s'] / demand:.1f}x" if demand else "-"
            table.add_row(
                str(row["workers"]),
                f"{row['outliers_per_s']:.0f}",
                f"{row['mb_per_s']:.0f}",
                f"{row['cpu_ms_per_batch']:.1f}",
                f"{row['outliers_per_cpu_s']:.0f}",
                versus,
            )
        table.caption = (
            f"demand: {args.demand_steps_per_s} steps/s x {BATCH} = {demand:.0f} outliers/s; "
            f"100k such outliers: {result['sd']['extrapolated_100k_gb']} GB"
            + (" (extrapolated)" if written["samples"] < 100_000 else "")
        )
        console.print(table)

    result["load_average_after"] = os.getloadavg()
    console.print(f"load average before {result['load_average']}, after {result['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
