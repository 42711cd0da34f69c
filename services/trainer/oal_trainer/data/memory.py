"""Every outlier of a job held in memory as tensors; `batch_size` per step by seeded permutations."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from oal_shared.errors import ManifestError, ShardError
from oal_shared.shards import ReadStats
from oal_shared.shards.blocks import read_shard_block
from oal_trainer.data.outliers import ManifestOutliers, OutlierBatch, OutlierStats
from oal_trainer.data.seeds import seeded_generator

logger = logging.getLogger(__name__)


class InMemoryOutliers(ManifestOutliers):
    """Every outlier loaded once into tensors; batches drawn by seeded permutations per epoch.

    Same interface as OutlierStream, for data that fits in memory (4x8x8 latents: 1 KB each) and to
    measure what streaming costs. Every batch has exactly `batch_size` rows: with fewer outliers
    than that, a batch repeats them (a warning names both numbers), since the CLUB terms pair
    each outlier row with an ID row.
    """

    def __init__(
        self,
        shard_dir: Path,
        *,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        on_bad_shard: Literal["raise", "skip"] = "raise",
        rank: int = 0,
    ):
        super().__init__(shard_dir, batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=seed, rank=rank)
        self.stats = OutlierStats()
        read_stats = ReadStats()
        blocks = [
            read_shard_block(url, info, self.manifest.layout, on_error=on_bad_shard, stats=read_stats)
            for url, info in zip(self.urls, self.manifest.shards, strict=True)
        ]
        self.stats.skipped = read_stats.skipped
        self.stats.errors = list(read_stats.errors)
        keys = tuple(key for block in blocks for key in block.keys)
        if not keys:
            raise ShardError(f"no readable outlier samples in {self.shard_dir}")
        expected = self.manifest.num_samples
        if on_bad_shard == "raise" and len(keys) != expected:
            raise ManifestError(f"{self.shard_dir}: the shards hold {len(keys)} samples, the manifest says {expected}")
        # float16 latents widen to float32 exactly, as the per-sample collate did: the same draws as before.
        self.data = OutlierBatch(
            embeddings=torch.from_numpy(np.concatenate([block.embeddings for block in blocks])),
            latents=torch.from_numpy(np.concatenate([block.latents for block in blocks])).to(torch.float32),
            classes=torch.from_numpy(np.concatenate([block.classes for block in blocks])),
            keys=keys,
        )
        logger.info("Loaded %d outliers from %s into memory", len(self.data), self.shard_dir)
        self.warn_if_fewer_than_a_batch(len(self.data))

    def epoch(self, epoch: int) -> Iterator[OutlierBatch]:
        generator = seeded_generator(self.seed, "outliers", epoch, self.rank)
        total = len(self.data)
        order = torch.randperm(total, generator=generator)
        position = 0
        for _ in range(self.steps_per_epoch):
            # Too few left for a whole batch: append fresh permutations (more than one when the job
            # holds fewer outliers than a batch, which then repeats some).
            while len(order) - position < self.batch_size:
                order = torch.cat([order[position:], torch.randperm(total, generator=generator)])
                position = 0
            rows = order[position : position + self.batch_size]
            position += self.batch_size
            self.stats.batches += 1
            self.stats.samples += len(rows)
            yield OutlierBatch(
                embeddings=self.data.embeddings[rows],
                latents=self.data.latents[rows],
                classes=self.data.classes[rows],
                keys=tuple(self.data.keys[i] for i in rows.tolist()),
            )
