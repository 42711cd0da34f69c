"""A control job: an outlier job's samples with their latents replaced by seeded Gaussian noise.

Keys, classes, embeddings and provenance stay; each latent becomes noise with the job's own mean
and standard deviation per channel (over all its latents), stored in the job's dtype. Training on
it asks whether what the diffusion model made matters, or only that some latents are there.

    python benchmarks/study/noise_job.py runs/study/shards-600 runs/study/shards-600-noise
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from oal_shared.shards import iter_outlier_samples, load_manifest, write_manifest, write_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="a finished outlier job folder")
    parser.add_argument("out", type=Path, help="the control job folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = load_manifest(args.job)
    if args.out.exists():
        parser.error(f"{args.out} exists; pick a new folder")
    rng = np.random.default_rng(args.seed)
    shards = [list(iter_outlier_samples([path], layout=manifest.layout)) for path in manifest.shard_paths]
    latents = np.stack([s.latent.astype(np.float32) for shard in shards for s in shard])
    mean = latents.mean(axis=(0, 2, 3), keepdims=True)[0]  # (C, 1, 1)
    std = latents.std(axis=(0, 2, 3), keepdims=True)[0]
    infos = []
    for index, shard in enumerate(shards):
        noisy = [
            replace(s, latent=(mean + std * rng.standard_normal(s.latent.shape)).astype(s.latent.dtype)) for s in shard
        ]
        infos.append(write_shard(args.out, index, noisy))
    control = {"latents": "gaussian noise, per-channel mean and std of the job", "seed": args.seed}
    spec = {**manifest.spec, "control": control}
    write_manifest(args.out, spec, infos, generator=manifest.document["generator"])
    print(f"wrote {sum(i.count for i in infos)} noise outliers to {args.out}")


if __name__ == "__main__":
    main()
