"""Outlier shards: WebDataset tar files of synthesised latents, and the manifest of a finished job.

Layout (docs/METHOD.md, Contracts): shards `outliers-%06d.tar`, one sample per outlier, members

    <key>.cls         source ID class, ASCII int
    <key>.emb.npy     the conditioning embedding, (D,) float32
    <key>.json        provenance (job id, generator, seed, ...) plus "schema_version"
    <key>.latent.npy  z0 before any VAE decode, (C, H, W) float16 or float32, unscaled

and `manifest.json` with the job spec, per shard its name, sample count, bytes and sha256, the
samples' layout and the generator's id and content hash. A shard appears under its final name only
when complete: it is written to a hidden temp name, fsynced and renamed. The manifest comes last.

Modules by role, as webdataset splits writer, shard lists and tar iterators: `schema` (one
sample), `writer`, `files` (shards on disk), `manifest`, `reader` (pipelines), `policy` (errors).

Importing this package does not import webdataset, because webdataset imports torch and the API
process reads manifests without torch. Writing and reading import webdataset inside the calls.
"""

from oal_shared.shards.files import describe_shard, list_shards, shard_layout
from oal_shared.shards.manifest import (
    MANIFEST_SCHEMA_VERSION,
    GeneratorRef,
    OutlierManifest,
    load_manifest,
    read_manifest,
    verify_shards,
    write_manifest,
)
from oal_shared.shards.policy import ReadStats
from oal_shared.shards.reader import decode_outlier_sample, iter_outlier_samples, outlier_pipeline
from oal_shared.shards.schema import (
    MANIFEST_NAME,
    SAMPLE_MEMBERS,
    SHARD_PATTERN,
    SHARD_SCHEMA_VERSION,
    OutlierSample,
    SampleLayout,
    ShardInfo,
    sample_key,
    shard_name,
)
from oal_shared.shards.writer import write_shard

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "SAMPLE_MEMBERS",
    "SHARD_PATTERN",
    "SHARD_SCHEMA_VERSION",
    "GeneratorRef",
    "OutlierManifest",
    "OutlierSample",
    "ReadStats",
    "SampleLayout",
    "ShardInfo",
    "decode_outlier_sample",
    "describe_shard",
    "iter_outlier_samples",
    "list_shards",
    "load_manifest",
    "outlier_pipeline",
    "read_manifest",
    "sample_key",
    "shard_layout",
    "shard_name",
    "verify_shards",
    "write_manifest",
    "write_shard",
]
