"""Outliers streamed from shards: whole shards read in turn, `batch_size` per step from a shuffle pool.

Memory stays bounded by the pool (`shuffle_buffer` samples) and the shards in flight, whatever the
job's size. Per epoch:

1. A shard plan: shards drawn with replacement, each with probability proportional to its sample
   count (so every outlier is equally likely), seeded by (seed, epoch, rank). Drawing with
   replacement keeps every batch full even when the job holds fewer outliers than one batch.
2. Each planned shard is read whole (`oal_shared.shards.blocks`: one read, a sha256 against the
   manifest, a few numpy calls), in the training process or, with `workers` > 0, by DataLoader
   workers taking turns (worker w reads plan entries w, w + W, ...; the loader hands them back in
   plan order). A worker sends one message per shard, not per batch.
3. A pool of `shuffle_buffer` samples, filled from the plan, hands out each batch: B rows chosen by
   a seeded draw without replacement, each replaced by the next sample of the plan, which is
   WebDataset's buffer shuffle taken B at a time.

The draw depends on (seed, epoch, rank) only, not on the number of workers, so a run may change
`outlier_workers` and resume; a resume at an epoch boundary draws the same outliers. Reading on the
trainer's own cores costs about 4 us of CPU per 5 KB outlier drawn, the pool included (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from oal_shared.errors import OALError, ShardError
from oal_shared.shards import ReadStats
from oal_shared.shards.blocks import ShardBlock, read_shard_block
from oal_trainer.data.outliers import ManifestOutliers, OutlierBatch, OutlierStats
from oal_trainer.data.seeds import derive_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReaderDelta:
    """What reading one planned shard counted; travels with the block, so a worker's counts reach the run."""

    samples: int = 0
    skipped: int = 0
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class PlannedBlock:
    """One planned shard as tensors, with what reading it cost the reader's counts."""

    shard: int  # index into the manifest's shards
    keys: tuple[str, ...]
    latents: torch.Tensor  # (N, C, H, W), the stored dtype (widened when it enters the pool)
    embeddings: torch.Tensor  # (N, D) float32
    classes: torch.Tensor  # (N,) int64
    reader: ReaderDelta


class OutlierStream(ManifestOutliers):
    """Outliers streamed from the shards a job's manifest lists, `batch_size` per step (see the module)."""

    def __init__(
        self,
        shard_dir: Path,
        *,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        shuffle_buffer: int = 1000,
        on_bad_shard: Literal["raise", "skip"] = "raise",
        rank: int = 0,
        workers: int = 0,
    ):
        super().__init__(shard_dir, batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=seed, rank=rank)
        self.shuffle_buffer = shuffle_buffer
        self.on_bad_shard = on_bad_shard
        self.workers = workers
        self._totals = OutlierStats()
        self.warn_if_fewer_than_a_batch(self.manifest.num_samples)

    @property
    def stats(self) -> OutlierStats:
        return replace(self._totals, errors=list(self._totals.errors))

    def epoch(self, epoch: int) -> Iterator[OutlierBatch]:
        blocks = self._blocks(epoch)
        drawable = sum(1 for info in self.manifest.shards if info.count)
        try:
            pool = _ShufflePool(
                _Incoming(self._counted(blocks), self.shard_dir, drawable=drawable),
                size=max(self.shuffle_buffer, self.batch_size) if self.shuffle_buffer else 0,
                rng=np.random.default_rng(derive_seed(self.seed, "outlier-pool", epoch, self.rank)),
            )
            for _ in range(self.steps_per_epoch):
                self._totals.batches += 1
                yield pool.draw(self.batch_size)
        finally:
            blocks.close()  # a worker loader shuts its workers down now, not when collected

    def plan(self, epoch: int) -> Iterator[int]:
        """The shards this epoch reads, in order: endless, drawn with replacement by sample count."""
        counts = np.array([info.count for info in self.manifest.shards], dtype=np.float64)
        if counts.sum() == 0:
            raise ShardError(f"no outlier samples in {self.shard_dir}: the manifest lists {len(counts)} empty shards")
        rng = np.random.default_rng(derive_seed(self.seed, "outlier-shards", epoch, self.rank))
        while True:
            yield from rng.choice(len(counts), size=64, p=counts / counts.sum()).tolist()

    def read_planned(self, epoch: int, worker: int = 0, workers: int = 1) -> Iterator[PlannedBlock]:
        """This reader's share of the plan (entries worker, worker + workers, ...), each shard read whole."""
        # A damaged shard (under on_bad_shard=skip) is read once: what it still held is kept for
        # its later draws, so its warning and counts come once per reader and epoch.
        salvaged: dict[int, ShardBlock] = {}
        for position, shard in enumerate(self.plan(epoch)):
            if position % workers != worker:
                continue
            stats = ReadStats()
            block = salvaged.get(shard)
            if block is None:
                block = read_shard_block(
                    self.urls[shard],
                    self.manifest.shards[shard],
                    self.manifest.layout,
                    on_error=self.on_bad_shard,
                    stats=stats,
                )
                if stats.skipped or stats.errors:
                    salvaged[shard] = block
            yield PlannedBlock(
                shard=shard,
                keys=block.keys,
                latents=torch.from_numpy(block.latents),
                embeddings=torch.from_numpy(block.embeddings),
                classes=torch.from_numpy(block.classes),
                reader=ReaderDelta(samples=stats.samples, skipped=stats.skipped, errors=tuple(stats.errors)),
            )

    def _blocks(self, epoch: int) -> Iterator[PlannedBlock]:
        if self.workers == 0:
            return self.read_planned(epoch)
        return _from_workers(
            DataLoader(_PlanShare(self, epoch), batch_size=None, num_workers=self.workers, collate_fn=_as_is)
        )

    def _counted(self, blocks: Iterator[PlannedBlock]) -> Iterator[PlannedBlock]:
        for block in blocks:
            self._totals.samples += block.reader.samples
            self._totals.skipped += block.reader.skipped
            self._totals.errors.extend(block.reader.errors)
            yield block


class _Incoming:
    """The plan's samples in order, taken n at a time across shard boundaries."""

    def __init__(self, blocks: Iterator[PlannedBlock], shard_dir: Path, *, drawable: int):
        self.blocks = blocks
        self.drawable = drawable  # shards the plan can draw (those the manifest says hold samples)
        self.shard_dir = shard_dir
        self.block: PlannedBlock | None = None
        self.position = 0
        self.unreadable: set[int] = set()

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """The next `count` samples: latents (float32), embeddings, classes, keys."""
        parts: list[tuple[PlannedBlock, int, int]] = []
        needed = count
        while needed:
            if self.block is None or self.position == len(self.block.keys):
                self.block, self.position = self._next_block(), 0
            stop = min(len(self.block.keys), self.position + needed)
            parts.append((self.block, self.position, stop))
            needed -= stop - self.position
            self.position = stop
        latents = torch.cat([block.latents[a:b] for block, a, b in parts]).to(torch.float32)
        embeddings = torch.cat([block.embeddings[a:b] for block, a, b in parts])
        classes = torch.cat([block.classes[a:b] for block, a, b in parts])
        keys = [key for block, a, b in parts for key in block.keys[a:b]]
        return latents, embeddings, classes, keys

    def _next_block(self) -> PlannedBlock:
        while True:
            block = next(self.blocks)
            if len(block.keys):
                return block
            self.unreadable.add(block.shard)  # a shard the manifest says holds samples, none readable
            if len(self.unreadable) == self.drawable:
                raise ShardError(f"no readable outlier samples in {self.shard_dir} ({self.drawable} shards)")


class _ShufflePool:
    """WebDataset's buffer shuffle, B samples at a time: a batch takes B random rows, new samples fill them."""

    def __init__(self, incoming: _Incoming, *, size: int, rng: np.random.Generator):
        self.incoming = incoming
        self.rng = rng
        self.size = size
        if size:
            self.latents, self.embeddings, self.classes, self.keys = incoming.take(size)

    def draw(self, count: int) -> OutlierBatch:
        if not self.size:  # no shuffle: the plan's order
            latents, embeddings, classes, keys = self.incoming.take(count)
            return OutlierBatch(embeddings=embeddings, latents=latents, classes=classes, keys=tuple(keys))
        rows = torch.from_numpy(self.rng.choice(self.size, size=count, replace=False))
        batch = OutlierBatch(
            embeddings=self.embeddings[rows],
            latents=self.latents[rows],
            classes=self.classes[rows],
            keys=tuple(self.keys[row] for row in rows.tolist()),
        )
        latents, embeddings, classes, keys = self.incoming.take(count)
        self.latents[rows], self.embeddings[rows], self.classes[rows] = latents, embeddings, classes
        for row, key in zip(rows.tolist(), keys, strict=True):
            self.keys[row] = key
        return batch


def _as_is(block: PlannedBlock) -> PlannedBlock:
    return block


@dataclass(frozen=True)
class WorkerFailure:
    """A reader error caught in a worker, re-raised by the main process as itself.

    Letting it escape the worker would wrap it in DataLoader's "Caught ... in DataLoader worker"
    text and leave a crashed worker that takes seconds to shut down.
    """

    error: OALError


class _PlanShare(IterableDataset):
    """A DataLoader worker's share of an epoch's shard plan (worker w: entries w, w + W, ...)."""

    def __init__(self, stream: OutlierStream, epoch: int):
        self.stream = stream
        self.epoch = epoch

    def __iter__(self) -> Iterator[PlannedBlock | WorkerFailure]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self.stream.read_planned(self.epoch, worker, workers)
        except OALError as exc:
            yield WorkerFailure(exc)


def _from_workers(loader: DataLoader) -> Iterator[PlannedBlock]:
    """The loader's blocks in plan order; a worker's error is raised here, once the loader is let go."""
    batches = iter(loader)
    try:
        for item in batches:
            if isinstance(item, WorkerFailure):
                raise item.error
            yield item
    finally:
        del batches  # shuts the workers down at once (the plan is endless: they never finish)
