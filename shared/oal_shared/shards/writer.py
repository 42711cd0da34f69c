"""Writing one shard: every sample checked first, then a deterministic tar through an atomic file."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from oal_shared.errors import ShardError
from oal_shared.fsio import atomic_file
from oal_shared.shards.schema import (
    SHARD_SCHEMA_VERSION,
    OutlierSample,
    SampleLayout,
    ShardInfo,
    sample_problem,
    shard_name,
)

logger = logging.getLogger(__name__)


def write_shard(out_dir: str | Path, index: int, samples: Sequence[OutlierSample]) -> ShardInfo:
    """Write `samples` as shard `index` in `out_dir`; returns what the manifest needs about it.

    Every sample is checked before anything touches the disk, so a bad one leaves no file; all
    samples of a shard share one layout (latent shape and dtype, embedding size). The tar goes to
    a hidden temp name, is fsynced and renamed over the final name (a rewrite after a resumed job
    replaces the old shard whole). Same samples in the same order give the same bytes.
    """
    name = shard_name(index)
    samples = list(samples)
    _check_shard_samples(samples, name)
    encoded = [_encode_sample(sample, name) for sample in samples]

    from webdataset import TarWriter  # imports torch: only processes that write shards pay for it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    with atomic_file(final) as handle:
        sink = _HashingSink(handle)
        # mtime=0 and fixed owner/mode make the bytes a function of the samples alone.
        with TarWriter(sink, encoder=False, mtime=0) as writer:
            for sample in encoded:
                writer.write(sample)
    info = ShardInfo(name=name, count=len(samples), bytes=sink.size, sha256=sink.hexdigest())
    logger.info("Wrote shard %s: %d samples, %d bytes", final, info.count, info.bytes)
    return info


def _check_shard_samples(samples: list[OutlierSample], shard: str) -> None:
    if not samples:
        raise ShardError("samples: a shard needs at least one sample", shard=shard)
    first_seen: dict[str, int] = {}
    layout: SampleLayout | None = None
    for position, sample in enumerate(samples):
        if not isinstance(sample, OutlierSample):
            raise ShardError(
                f"samples[{position}]: expected an OutlierSample, got {type(sample).__name__}", shard=shard
            )
        # Checked again: arrays and meta are mutable after construction.
        problem = sample_problem(sample.key, sample.latent, sample.embedding, sample.cls, sample.meta)
        if problem is not None:
            raise ShardError(problem, shard=shard, key=sample.key)
        if sample.key in first_seen:
            raise ShardError(
                f"duplicate key: samples[{first_seen[sample.key]}] and samples[{position}] share it",
                shard=shard,
                key=sample.key,
            )
        first_seen[sample.key] = position
        if layout is None:
            layout = SampleLayout.of(sample.latent, sample.embedding)
        elif (mismatch := layout.mismatch(sample.latent, sample.embedding, "samples[0]")) is not None:
            raise ShardError(f"samples[{position}]: {mismatch}", shard=shard, key=sample.key)


def _encode_sample(sample: OutlierSample, shard: str) -> dict[str, Any]:
    """Member bytes of one sample; JSON with sorted keys so equal samples give equal bytes."""
    provenance = {**sample.meta, "schema_version": SHARD_SCHEMA_VERSION}
    try:
        meta_text = json.dumps(provenance, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShardError(f"meta: not JSON-serialisable ({exc})", shard=shard, key=sample.key) from exc
    return {
        "__key__": sample.key,
        "latent.npy": _npy_bytes(sample.latent),
        "emb.npy": _npy_bytes(sample.embedding),
        "cls": str(int(sample.cls)).encode("ascii"),
        "json": meta_text.encode("utf-8"),
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class _HashingSink:
    """A write-only file that hashes and counts what passes through (saves re-reading the shard)."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._handle.write(data)
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
