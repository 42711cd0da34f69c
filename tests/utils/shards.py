"""Builders of outlier samples and shard folders, for any test that needs real shards on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from oal_shared.shards import OutlierSample, ShardInfo, sample_key, write_manifest, write_shard

TEST_SPACE = "test/space-v1"
# What the manifest of a test job names as its generator; no folder has this content hash, so a
# decoder that checks its VAE folder against it refuses (pass `generator=` for a real folder).
TEST_GENERATOR = {"id": "tiny-random", "content_hash": hashlib.sha256(b"test generator").hexdigest()}


def make_outlier_samples(
    n: int,
    latent_shape: tuple[int, int, int] = (4, 8, 8),
    dim: int = 64,
    num_classes: int = 6,
    seed: int = 0,
    latent_dtype: type = np.float16,
    job_id: str = "job0",
    first: int = 0,
) -> list[OutlierSample]:
    """`n` random samples with distinct keys; sample i has class i % num_classes.

    `first` offsets the running index, so several calls can build disjoint keys for one job.
    Provenance mirrors what the synthesis worker records.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(first, first + n):
        cls = i % num_classes
        boundary_index = i // num_classes
        samples.append(
            OutlierSample(
                key=sample_key(job_id, cls, boundary_index, rep=0),
                latent=rng.standard_normal(latent_shape).astype(latent_dtype),
                embedding=rng.standard_normal(dim).astype(np.float32),
                cls=cls,
                meta={
                    "job_id": job_id,
                    "generator": "tiny-random",
                    "space": TEST_SPACE,
                    "class": cls,
                    "boundary_index": boundary_index,
                    "seed": seed * 1_000_003 + i,
                    "scheduler": "ddim",
                    "steps": 2,
                    "guidance": 1.0,
                    "scaling_factor": 1.0,
                },
            )
        )
    return samples


def write_outlier_shards(
    out_dir: Path,
    num_shards: int = 2,
    per_shard: int = 8,
    spec: dict | None = None,
    generator: dict | None = None,
    **sample_kwargs,
) -> list[ShardInfo]:
    """A finished job's folder: `num_shards` shards of `per_shard` samples each, plus manifest.json
    naming `generator` (default TEST_GENERATOR)."""
    infos = []
    for index in range(num_shards):
        samples = make_outlier_samples(per_shard, first=index * per_shard, **sample_kwargs)
        infos.append(write_shard(out_dir, index, samples))
    write_manifest(
        out_dir,
        spec if spec is not None else {"num_outliers": num_shards * per_shard},
        infos,
        generator=generator if generator is not None else TEST_GENERATOR,
    )
    return infos
