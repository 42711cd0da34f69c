"""Boundary sampler speed: the vectorised `sample_class_outliers` against a per-point loop reference.

The reference does what the method says one point at a time: the k-th NN distance of each class
point, then for each boundary point and each candidate its own distance row and sort. Both use the
same noise draws, and the script checks they keep the same outliers before it reports times.

    .venv/bin/python benchmarks/bench_sampler.py            # paper sizes: N=500, K=300, 50 x 1500
    .venv/bin/python benchmarks/bench_sampler.py --dim 768  # SD v1.4's token dimension
    .venv/bin/python benchmarks/bench_sampler.py --backends --json artifacts/bench/sampler_backends.json

`--backends` compares the k-NN backends (`sampler.knn_backend`: torch, faiss) instead: one class
of N = 500 and 5,000 points at D = 64 and 768, the paper's sampler settings, the two backends
interleaved (torch, faiss, torch, faiss, ...) so load drifts cancel in the ratio, and whether they
kept the same outliers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from oal_synth.sampler import CANDIDATE_BLOCK_ELEMENTS, knn_distance, sample_class_outliers
from oal_synth.spec import SamplerConfig


def naive_kth(point: torch.Tensor, bank: torch.Tensor, k: int) -> float:
    return float(torch.sort((bank - point).norm(dim=1)).values[k - 1])


def naive_sampler(embeddings: torch.Tensor, config: SamplerConfig, generator: torch.Generator) -> torch.Tensor:
    """One point at a time; returns the kept outliers in the sampler's rank-major order."""
    bank = F.normalize(embeddings, dim=1)
    k = min(config.k, len(bank))
    kth = torch.tensor([naive_kth(point, bank, k) for point in bank])
    boundary = torch.topk(kth, config.select).indices
    # Same noise as the sampler: drawn in its fixed blocks of boundary points.
    per_block = max(1, CANDIDATE_BLOCK_ELEMENTS // (config.n_candidates * bank.shape[1]))
    eps = torch.cat([
        torch.randn((len(boundary[start : start + per_block]), config.n_candidates, bank.shape[1]), generator=generator)
        for start in range(0, len(boundary), per_block)
    ])  # fmt: skip
    kept = []
    for i, index in enumerate(boundary):
        candidates = [F.normalize(bank[index] + config.sigma * eps[i, j], dim=0) for j in range(config.n_candidates)]
        scores = torch.tensor([naive_kth(c, bank, k) for c in candidates])
        kept.append(torch.stack([candidates[j] for j in torch.topk(scores, config.keep).indices]))
    return torch.stack(kept).transpose(0, 1).reshape(-1, bank.shape[1])


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def compare_backends(args) -> None:
    """torch vs faiss k-NN over a grid of class sizes and dimensions, interleaved; best of `repeats`."""
    import faiss  # noqa: F401  (fails here, with its name, when the extra is missing)

    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    for points in (500, 5000):
        for dim in (64, 768):
            embeddings = torch.randn(points, dim, generator=torch.Generator().manual_seed(0))
            configs = {
                name: SamplerConfig(n_candidates=args.candidates, knn_backend=name) for name in ("torch", "faiss")
            }
            seconds: dict[str, list[float]] = {name: [] for name in configs}
            outliers = {}
            for _ in range(args.repeats):
                for name, config in configs.items():
                    result, took = timed(
                        lambda c=config, e=embeddings: sample_class_outliers(e, c, torch.Generator().manual_seed(1), 0)
                    )
                    seconds[name].append(took)
                    outliers[name] = result
            same_boundary = torch.equal(outliers["torch"].boundary_index, outliers["faiss"].boundary_index)
            same = same_boundary and torch.allclose(
                outliers["torch"].embeddings, outliers["faiss"].embeddings, atol=1e-6
            )
            row = {
                "points": points, "dim": dim, "torch_s": min(seconds["torch"]), "faiss_s": min(seconds["faiss"]),
                "torch_s_all": seconds["torch"], "faiss_s_all": seconds["faiss"], "same_outliers": same,
            }  # fmt: skip
            row["faiss_speedup"] = row["torch_s"] / row["faiss_s"]
            rows.append(row)
            print(
                f"N={points:>5} D={dim:>3}: torch {row['torch_s']:.3f} s, faiss {row['faiss_s']:.3f} s, "
                f"torch/faiss {row['faiss_speedup']:.2f}x, same outliers: {same}"
            )
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load {' '.join(load_before)} -> {' '.join(load_after)}; {args.threads} threads")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "k": 300, "select": 50, "n_candidates": args.candidates, "threads": args.threads,
            "repeats": args.repeats, "loadavg_before": load_before, "loadavg_after": load_after, "rows": rows,
        }, indent=2))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=500, help="class set size N")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension D")
    parser.add_argument("--candidates", type=int, default=1500, help="n_candidates per boundary point")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--backends", action="store_true", help="compare the torch and faiss k-NN backends")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend (--backends)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backends:
        compare_backends(args)
        return
    config = SamplerConfig(n_candidates=args.candidates)
    embeddings = torch.randn(args.points, args.dim, generator=torch.Generator().manual_seed(0))

    # Warm up both paths first (torch's first calls allocate and pick kernels), then keep the best of 3.
    sample_class_outliers(embeddings, config, torch.Generator().manual_seed(1), 0)
    naive_sampler(embeddings[:50], config.model_copy(update={"select": 1, "n_candidates": 10}), torch.Generator())
    runs = [
        timed(lambda: sample_class_outliers(embeddings, config, torch.Generator().manual_seed(1), 0)) for _ in range(3)
    ]
    fast, fast_s = min(runs, key=lambda run: run[1])
    slow, slow_s = timed(lambda: naive_sampler(embeddings, config, torch.Generator().manual_seed(1)))
    same = torch.allclose(fast.embeddings, slow, atol=1e-5)
    knn_only, knn_s = timed(lambda: knn_distance(embeddings, embeddings, config.k))
    candidates = config.select * config.n_candidates

    table = Table(
        title=f"Boundary sampler, one class: N={args.points}, D={args.dim}, K={config.k}, "
        f"{config.select} x {config.n_candidates} candidates, {args.threads} threads"
    )
    for column in ("implementation", "seconds", "candidates/s", "speed-up"):
        table.add_column(column, justify="right" if column != "implementation" else "left")
    table.add_row("per-point loop", f"{slow_s:.2f}", f"{candidates / slow_s:,.0f}", "1.0x")
    table.add_row("vectorised torch", f"{fast_s:.3f}", f"{candidates / fast_s:,.0f}", f"{slow_s / fast_s:.0f}x")
    Console().print(table)
    Console().print(
        f"same outliers: {same}; k-NN of the class set alone: {knn_s * 1000:.1f} ms ({len(knn_only)} points)"
    )
    if args.json:
        args.json.write_text(json.dumps({
            "points": args.points, "dim": args.dim, "k": config.k, "select": config.select,
            "n_candidates": config.n_candidates, "threads": args.threads, "naive_s": slow_s,
            "vectorised_s": fast_s, "speedup": slow_s / fast_s, "same_outliers": same,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
