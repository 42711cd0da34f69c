"""What every outlier source shares: the batch type, its counts, and the manifest it opens first.

A source reads a finished job folder. It opens `manifest.json` before anything else: the shard
list, the sample count, the layout (latent shape and dtype, embedding size) and the generator
come from it, so nothing is inferred from a first sample, and a folder without a manifest (a job
still running, or one that crashed) is refused with a ManifestError that says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from oal_shared.errors import ConfigError
from oal_shared.shards import OutlierManifest, load_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class OutlierBatch:
    """B outliers as tensors; rows are samples."""

    embeddings: torch.Tensor  # (B, D) float32
    latents: torch.Tensor  # (B, C, H, W) float32, unscaled as stored
    classes: torch.Tensor  # (B,) int64, source ID class
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.classes.shape[0])


@dataclass
class OutlierStats:
    """Counts a run records: samples read, batches handed out, shards skipped and why."""

    samples: int = 0
    batches: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


class OutlierSource(Protocol):
    """Anything that yields exactly `steps_per_epoch` batches of `batch_size` outliers per epoch."""

    batch_size: int
    steps_per_epoch: int
    manifest: OutlierManifest

    @property
    def stats(self) -> OutlierStats: ...

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...

    @property
    def embed_dim(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[OutlierBatch]: ...


class ManifestOutliers:
    """Base of the outlier sources: opens the job folder's manifest, takes shards and shapes from it."""

    def __init__(self, shard_dir: Path, *, batch_size: int, steps_per_epoch: int, seed: int, rank: int):
        for name, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        self.shard_dir = Path(shard_dir)
        self.manifest = load_manifest(self.shard_dir)
        self.urls = [str(path) for path in self.manifest.shard_paths]
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.manifest.layout.latent_shape

    @property
    def embed_dim(self) -> int:
        return self.manifest.layout.embed_dim

    def warn_if_fewer_than_a_batch(self, available: int) -> None:
        """Batches are always `batch_size` long; with fewer outliers than that they repeat some."""
        if available < self.batch_size:
            logger.warning(
                "Outliers: %s has %d outliers, fewer than the %d each step takes; "
                "every batch repeats outliers (drawn with replacement up to %d)",
                self.shard_dir,
                available,
                self.batch_size,
                self.batch_size,
            )


def shard_urls(shard_dir: Path) -> list[str]:
    """The shards a finished job's manifest lists, as paths (ManifestError if it has none)."""
    return [str(path) for path in load_manifest(shard_dir).shard_paths]
