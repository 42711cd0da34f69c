"""One shard as arrays: every sample of a shard read at once, for the trainer's sources.

`read_shard_block` reads a shard whole and checks its bytes against the size and sha256 its
manifest entry records. A shard that matches is, byte for byte, what the writer wrote after it
checked every sample (`sample_problem`), so the fast path does only what costs little and keeps a
foreign or stale writer honest: the members of each sample, the key, the class, the two `.npy`
headers against the manifest's layout, and finiteness over the whole block at once. It does not
parse each sample's JSON provenance, which the trainer never uses.

A stream draws the same shards again and again, so what the walk through the tar found (keys,
payload offsets, classes) is kept per file, keyed by its path, size, mtime and inode: a shard read
again is one read and a copy per payload, with no digest and no walk. A file replaced since (new
mtime or inode) is checked whole again. The index is about 150 bytes a sample, a few MB for a
100k-outlier job. This is what makes streaming cheap: about 4 us of CPU for a 5 KB sample
instead of about 80 us through the per-sample reader (docs/BENCHMARKS.md, "Trainer: outliers
streamed from shards").

Anything else (a file that differs from its entry, a sample the fast path does not recognise)
goes through `iter_outlier_samples`, the per-sample reader with every check, so the error names
the shard and key exactly as before and on_error="skip" keeps every readable sample. A shard that
differs from its manifest entry but reads cleanly is still refused under "raise" (it changed after
the job finished); under "skip" its samples are kept and the difference is counted as an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from oal_shared.errors import ShardError
from oal_shared.shards.policy import ReadStats, check_on_error
from oal_shared.shards.reader import iter_outlier_samples, npy_header, npy_header_fields
from oal_shared.shards.schema import KEY_PATTERN, SAMPLE_MEMBERS, OutlierSample, SampleLayout, ShardInfo
from oal_shared.shards.tar_walk import group_samples

logger = logging.getLogger(__name__)

_MEMBERS = frozenset(SAMPLE_MEMBERS)


@dataclass(frozen=True, eq=False)
class ShardBlock:
    """The samples of one shard, row i of each array being sample i in file order."""

    keys: tuple[str, ...]
    latents: np.ndarray  # (N, C, H, W), the dtype stored (float16 or float32)
    embeddings: np.ndarray  # (N, D) float32
    classes: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls, layout: SampleLayout) -> ShardBlock:
        return cls(
            keys=(),
            latents=np.empty((0, *layout.latent_shape), dtype=layout.numpy_dtype),
            embeddings=np.empty((0, layout.embed_dim), dtype=np.float32),
            classes=np.empty((0,), dtype=np.int64),
        )

    @classmethod
    def of_samples(cls, samples: list[OutlierSample], layout: SampleLayout) -> ShardBlock:
        if not samples:
            return cls.empty(layout)
        return cls(
            keys=tuple(s.key for s in samples),
            latents=np.stack([s.latent for s in samples]),
            embeddings=np.stack([s.embedding for s in samples]),
            classes=np.array([s.cls for s in samples], dtype=np.int64),
        )


def read_shard_block(
    path: str | Path,
    info: ShardInfo,
    layout: SampleLayout,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    stats: ReadStats | None = None,
) -> ShardBlock:
    """Every sample of the shard at `path`, whose manifest entry is `info` and layout `layout`.

    Errors and counts follow `iter_outlier_samples`: "raise" raises ShardError naming the shard
    (and key), "skip" counts the problem in `stats` and keeps the readable samples.
    """
    check_on_error(on_error)
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    try:
        with open(path, "rb") as handle:  # the identity and the bytes of one open file, whatever replaces it
            identity = _FileIdentity.of(path, os.fstat(handle.fileno()), info, layout)
            data = handle.read()
    except OSError:
        data = None  # the per-sample reader reports it under the policy
    digest = None  # of `data`, computed at most once: a kept index means the file was checked before
    if data is not None:
        index = _INDEXES.get(identity)
        if index is None:
            digest = hashlib.sha256(data).hexdigest()
            if len(data) == info.bytes and digest == info.sha256:
                index = _index_of(data, layout)
                if index is not None:
                    _INDEXES.put(identity, index)
        block = index.gather(data, layout) if index is not None and len(data) == info.bytes else None
        if block is not None:
            stats.samples += len(block)
            return block
    samples = list(iter_outlier_samples([path], on_error=on_error, stats=stats, layout=layout))
    if data is not None:
        digest = digest or hashlib.sha256(data).hexdigest()
        if len(data) != info.bytes or digest != info.sha256:
            _changed(path, len(data), digest, info, on_error, stats)
    return ShardBlock.of_samples(samples, layout)


def _changed(path: Path, size: int, digest: str, info: ShardInfo, on_error: str, stats: ReadStats) -> None:
    """A shard that reads cleanly but is not the file its manifest entry describes."""
    error = ShardError(
        f"{size} bytes with sha256 {digest[:12]}..., but the manifest records {info.bytes} bytes with "
        f"sha256 {info.sha256[:12]}...: the file changed after the job finished (run the job again)",
        shard=str(path),
    )
    if on_error == "raise":
        raise error
    stats.errors.append(str(error))
    logger.warning("Reading it anyway (on_error=skip): %s", error)


@dataclass(frozen=True)
class _FileIdentity:
    """A shard file as the index cache knows it: replaced or touched, it is another file."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    sha256: str  # of the manifest entry it was checked against
    layout: SampleLayout

    @classmethod
    def of(cls, path: Path, status: os.stat_result, info: ShardInfo, layout: SampleLayout) -> _FileIdentity:
        return cls(str(path), status.st_size, status.st_mtime_ns, status.st_ino, info.sha256, layout)


@dataclass(frozen=True, eq=False)
class _ShardIndex:
    """Where each sample's payloads sit in a shard checked against its sha256, and its key and class."""

    keys: tuple[str, ...]
    latent_at: list[int]
    embed_at: list[int]
    classes: np.ndarray  # (N,) int64

    def gather(self, data: bytes, layout: SampleLayout) -> ShardBlock | None:
        """The block, copied out of `data`; None if a value is not finite."""
        count, latent_size = len(self.keys), int(np.prod(layout.latent_shape))
        latents = np.empty((count, *layout.latent_shape), dtype=layout.numpy_dtype)
        embeddings = np.empty((count, layout.embed_dim), dtype=np.float32)
        latent_rows = latents.reshape(count, latent_size)
        for row, (latent_at, embed_at) in enumerate(zip(self.latent_at, self.embed_at, strict=True)):
            latent_rows[row] = np.frombuffer(data, latents.dtype, latent_size, latent_at)
            embeddings[row] = np.frombuffer(data, np.float32, layout.embed_dim, embed_at)
        if not (np.isfinite(latents).all() and np.isfinite(embeddings).all()):
            return None
        return ShardBlock(keys=self.keys, latents=latents, embeddings=embeddings, classes=self.classes.copy())


class _IndexCache:
    """The indexes of the shards this process read last (bounded: a stream revisits a job's shards)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[_FileIdentity, _ShardIndex] = OrderedDict()

    def get(self, identity: _FileIdentity) -> _ShardIndex | None:
        index = self.entries.get(identity)
        if index is not None:
            self.entries.move_to_end(identity)
        return index

    def put(self, identity: _FileIdentity, index: _ShardIndex) -> None:
        self.entries[identity] = index
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


_INDEXES = _IndexCache(capacity=4096)


def forget_shard_indexes() -> None:
    """Drop every kept index, so the next read of each shard is a first read (for benchmarks)."""
    _INDEXES.entries.clear()


def _index_of(data: bytes, layout: SampleLayout) -> _ShardIndex | None:
    """The index of a shard already checked against its sha256, or None if any sample is unusual.

    Unusual: other members, a key or class the rules refuse, an `.npy` header unlike the first
    sample's or not of the layout (shape, dtype, C order), a short payload.
    """
    try:
        grouped = list(group_samples(data, check_headers=False))  # the digest covered the headers
    except (tarfile.TarError, ValueError):
        return None  # the careful reader names the fault
    if not grouped or grouped[0][1].keys() != _MEMBERS:
        return None
    first = grouped[0][1]
    latent_header = _header_of(data, first["latent.npy"], layout.latent_shape, layout.numpy_dtype)
    embed_header = _header_of(data, first["emb.npy"], (layout.embed_dim,), np.dtype(np.float32))
    if latent_header is None or embed_header is None:
        return None
    latent_bytes = int(np.prod(layout.latent_shape)) * layout.numpy_dtype.itemsize
    embed_bytes = 4 * layout.embed_dim
    keys, latent_at, embed_at, classes = [], [], [], []
    for key, members in grouped:
        if members.keys() != _MEMBERS or not KEY_PATTERN.match(key):
            return None
        start, size = members["cls"]
        cls_text = data[start : start + size].strip()
        latent = _payload_at(data, members["latent.npy"], latent_header, latent_bytes)
        embed = _payload_at(data, members["emb.npy"], embed_header, embed_bytes)
        if latent is None or embed is None or not cls_text.isdigit():
            return None
        keys.append(key)
        latent_at.append(latent)
        embed_at.append(embed)
        classes.append(int(cls_text))
    return _ShardIndex(tuple(keys), latent_at, embed_at, np.array(classes, dtype=np.int64))


def _header_of(data: bytes, member: tuple[int, int], shape: tuple[int, ...], dtype: np.dtype) -> bytes | None:
    """The `.npy` header bytes of a member if numpy reads them as a C-ordered `shape` array of `dtype`.

    Learnt from the shard's first sample (a writer's numpy version decides the padding), then
    compared byte for byte with every other sample's.
    """
    start, size = member
    header = npy_header(data[start : start + size])
    fields = npy_header_fields(header) if header is not None else None
    if fields is None or fields[0] != dtype or fields[1] != tuple(shape):
        return None
    return header


def _payload_at(data: bytes, member: tuple[int, int], header: bytes, payload: int) -> int | None:
    """Where an `.npy` member's payload starts, if it has exactly `header` and enough bytes."""
    start, size = member
    if size < len(header) + payload or not data.startswith(header, start):
        return None
    return start + len(header)
