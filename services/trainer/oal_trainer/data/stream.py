"""Outliers streamed from shards, `batch_size` per step, read in the main process or in workers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from oal_shared.errors import OALError, ShardError
from oal_shared.shards import OutlierSample, ReadStats, outlier_pipeline
from oal_trainer.data.outliers import ManifestOutliers, OutlierBatch, OutlierStats, ReaderDelta, collate_outliers
from oal_trainer.data.seeds import derive_seed, seeded_generator

logger = logging.getLogger(__name__)


class OutlierStream(ManifestOutliers):
    """Outliers streamed from shards: resampled with a seeded shuffle, `batch_size` per step.

    Shards, shapes and the sample count come from the job's manifest (refused without one). Each
    epoch builds fresh pipelines seeded by (seed, epoch, rank, reader), so a run resumed at an
    epoch boundary draws the same outliers, and ranks draw different ones. With `workers` > 0 the
    shards are read and decoded in DataLoader worker processes (tar parsing is pure Python and costs
    about as much as a student step on 2 cores); worker w makes steps w, w + W, ... of the epoch and
    the loader hands them out in step order. Shards are drawn with replacement, so every batch is
    full even when the job holds fewer outliers than one batch (they repeat; a warning says so).
    Should a pipeline run dry (every shard skipped), it is rebuilt; no readable sample at all
    raises ShardError.
    """

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
        if self.workers == 0:
            batches: Iterator[OutlierBatch] = self.reader_batches(epoch, self.steps_per_epoch, reader=0)
        else:
            batches = iter(
                DataLoader(
                    _WorkerBatches(self, epoch),
                    batch_size=None,
                    num_workers=self.workers,
                    collate_fn=_as_is,
                    generator=seeded_generator(self.seed, "outlier-loader", epoch, self.rank),
                )
            )
        for batch in batches:
            if isinstance(batch, WorkerFailure):
                for _ in batches:  # let the loader see the worker finish, so it shuts down at once
                    pass
                raise batch.error
            self._count(batch)
            yield batch

    def _count(self, batch: OutlierBatch) -> None:
        self._totals.batches += 1
        if batch.reader is not None:
            self._totals.samples += batch.reader.samples
            self._totals.skipped += batch.reader.skipped
            self._totals.restarts += batch.reader.restarts
            self._totals.errors.extend(batch.reader.errors)

    def reader_batches(self, epoch: int, count: int, reader: int) -> Iterator[OutlierBatch]:
        """`count` batches from one reader (the main process or one worker), each with its counts."""
        stats = ReadStats()
        in_worker = get_worker_info() is not None
        seen = {"samples": 0, "skipped": 0, "errors": 0, "restarts": 0}
        restarts = 0

        def with_delta(samples: list[OutlierSample]) -> OutlierBatch:
            delta = ReaderDelta(
                samples=stats.samples - seen["samples"],
                skipped=stats.skipped - seen["skipped"],
                restarts=restarts - seen["restarts"],
                errors=tuple(stats.errors[seen["errors"] :]),
            )
            seen.update(samples=stats.samples, skipped=stats.skipped, errors=len(stats.errors), restarts=restarts)
            return replace(collate_outliers(samples, shared=in_worker), reader=delta)

        # A batch is handed out only when full; a pipeline that stops early leaves `pending` for
        # the next one, so no batch is ever short.
        pending: list[OutlierSample] = []
        handed_out = 0
        while handed_out < count:
            got = 0
            pipeline = outlier_pipeline(
                self.urls,
                resampled=True,
                epoch_length=count * self.batch_size,
                shuffle=self.shuffle_buffer,
                seed=derive_seed(self.seed, "outliers", epoch, self.rank, reader, restarts) % 2**31,
                on_error=self.on_bad_shard,
                stats=stats,
                # Resampled streams are not split: each rank and worker draws its own (seeded by rank too).
                split_by_node=True,
                layout=self.manifest.layout,
            )
            for sample in pipeline:
                got += 1
                pending.append(sample)
                if len(pending) == self.batch_size:
                    handed_out += 1
                    yield with_delta(pending)
                    pending = []
                    if handed_out == count:
                        return
            if got == 0:
                raise ShardError(f"no readable outlier samples in {self.shard_dir} ({len(self.urls)} shards)")
            restarts += 1
            logger.warning("Outlier pipeline ran dry after %d samples; restarting it", got)


def _as_is(batch: OutlierBatch) -> OutlierBatch:
    return batch


@dataclass(frozen=True)
class WorkerFailure:
    """A reader error caught in a worker, re-raised by the main process as itself.

    Letting it escape the worker would wrap it in DataLoader's "Caught ... in DataLoader worker"
    text and leave a crashed worker that takes seconds to shut down.
    """

    error: OALError


class _WorkerBatches(IterableDataset):
    """One epoch of an OutlierStream, split over DataLoader workers by step (worker w: w, w+W, ...)."""

    def __init__(self, stream: OutlierStream, epoch: int):
        self.stream = stream
        self.epoch = epoch

    def __iter__(self) -> Iterator[OutlierBatch | WorkerFailure]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        count = len(range(worker, self.stream.steps_per_epoch, workers))
        try:
            yield from self.stream.reader_batches(self.epoch, count, reader=worker)
        except OALError as exc:
            yield WorkerFailure(exc)
