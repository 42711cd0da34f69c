"""What the fit loop consumes: ID images as normalised tensors, and exactly B outliers per step.

ID data: the benchmark's uint8 images become float tensors (B, C, H, W) standardised with the
benchmark's mean/std, held in memory (Fashion-MNIST ID train is 36k x 784 floats, 113 MB), served by
a DataLoader whose order is fixed by (seed, epoch). Augmentation (random crop with padding, flip)
runs on whole batches with its own (seed, epoch) generator, so an epoch replays exactly on resume.

Outliers: `OutlierStream` reads shards through `oal_shared.shards.outlier_pipeline` (resampled and
shuffled: every rank and DataLoader worker draws its own seeded stream); `InMemoryOutliers` loads
every sample once. Both hand out `OutlierBatch`es of exactly `batch_size` rows, `steps_per_epoch`
per epoch, seeded per epoch and rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    TensorDataset,
    get_worker_info,
)

from oal_shared import seeds as shared_seeds
from oal_shared.errors import ConfigError, OALError, ShardError
from oal_shared.shards import OutlierSample, ReadStats, iter_outlier_samples, list_shards, outlier_pipeline

if TYPE_CHECKING:
    from oal_shared.data.benchmark import Benchmark, ImageSet

logger = logging.getLogger(__name__)


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed for one of the trainer's streams, e.g. derive_seed(seed, "order", epoch)."""
    return shared_seeds.derive_seed("oal-train", seed, *parts)


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    return shared_seeds.seeded_generator("oal-train", seed, *parts)


# ---------------------------------------------------------------- ID images


def to_model_input(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 (N, C, H, W), scaled to [0, 1] and standardised."""
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # astype copies: benchmarks are read-only
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def subset_indices(total: int, limit: int | None, seed: int, name: str) -> np.ndarray:
    """Sorted indices of a seeded random subset of `limit` items (all when limit is None or >= total)."""
    if limit is None or limit >= total:
        return np.arange(total)
    rng = np.random.default_rng(derive_seed(seed, "subset", name))
    return np.sort(rng.choice(total, size=limit, replace=False))


@dataclass(frozen=True, eq=False)
class IDTrainSet:
    """The ID training images the run uses; `images[i]` is image `source_index[i]` of the benchmark."""

    images: torch.Tensor  # (N, C, H, W) float32, standardised
    labels: torch.Tensor  # (N,) int64
    source_index: np.ndarray  # (N,) int64, rows of benchmark.id_train

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def id_train_set(benchmark: Benchmark, subset: int | None, seed: int) -> IDTrainSet:
    rows = subset_indices(len(benchmark.id_train), subset, seed, benchmark.id_train.name)
    images = to_model_input(benchmark.id_train.images[rows], benchmark.mean, benchmark.std)
    labels = torch.from_numpy(np.asarray(benchmark.id_train.labels[rows], dtype=np.int64))
    return IDTrainSet(images, labels, rows.astype(np.int64))


def slice_benchmark(benchmark: Benchmark, per_set: int | None, seed: int) -> Benchmark:
    """The benchmark with every evaluation set cut to a seeded subset of `per_set` images (smoke runs)."""
    if per_set is None:
        return benchmark

    def cut(image_set: ImageSet) -> ImageSet:
        rows = subset_indices(len(image_set), per_set, seed, image_set.name)
        return replace(image_set, images=image_set.images[rows], labels=image_set.labels[rows])

    return replace(
        benchmark,
        id_test=cut(benchmark.id_test),
        near=tuple(cut(s) for s in benchmark.near),
        far=tuple(cut(s) for s in benchmark.far),
    )


def id_loader(
    train: IDTrainSet,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Batches (images (B,C,H,W), labels (B,), row (B,)) in an order fixed by (seed, epoch).

    The last incomplete batch is dropped: every step sees exactly B images (BatchNorm and the B
    outliers drawn per step stay paired). Under torchrun each rank reads its own shard of the rows.
    """
    if len(train) // world_size < batch_size:
        raise ConfigError(
            f"batch_size: {batch_size} is more than the {len(train) // world_size} ID images per rank; "
            "lower batch_size or raise train_subset"
        )
    dataset = TensorDataset(train.images, train.labels, torch.arange(len(train)))
    if world_size > 1:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=derive_seed(seed, "order") % 2**31,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=seeded_generator(seed, "order", epoch))
    # The loader's own generator too: otherwise it draws its base seed from torch's global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        generator=seeded_generator(seed, "loader", epoch, rank),
    )


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    return (num_images // world_size) // batch_size


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, padding: int, hflip: bool, pad_value: torch.Tensor
) -> torch.Tensor:
    """Random crop after padding (per image offsets) and horizontal flip, on a whole batch.

    x: (B, C, H, W) standardised; `pad_value` (1, C, 1, 1) is black in standardised units, so the
    padding looks like torchvision's RandomCrop(padding) on the raw image.
    """
    b, c, h, w = x.shape
    out = x
    if padding > 0:
        padded = pad_value.expand(b, c, h + 2 * padding, w + 2 * padding).clone()  # (B, C, H+2p, W+2p)
        padded[:, :, padding : padding + h, padding : padding + w] = x
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)  # (B,)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)  # (B,)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        channel = torch.arange(c)[None, :, None, None]
        out = padded[batch, channel, rows, cols]  # (B, C, H, W)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5  # (B,)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def black_pixel(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The value a 0 pixel takes after standardisation, (1, C, 1, 1)."""
    return (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).float()


# ---------------------------------------------------------------- outliers


@dataclass(frozen=True, eq=False)
class OutlierBatch:
    """B outliers as tensors; rows are samples."""

    embeddings: torch.Tensor  # (B, D) float32
    latents: torch.Tensor  # (B, C, H, W) float32, unscaled as stored
    classes: torch.Tensor  # (B,) int64, source ID class
    keys: tuple[str, ...]
    reader: ReaderDelta | None = None  # what the reader saw while making this batch (stream only)

    def __len__(self) -> int:
        return int(self.classes.shape[0])


@dataclass(frozen=True)
class ReaderDelta:
    """Reader counts since the previous batch of the same reader; travels with the batch, so counts
    made in a DataLoader worker process reach the main process."""

    samples: int = 0
    skipped: int = 0
    restarts: int = 0
    errors: tuple[str, ...] = ()


def collate_outliers(samples: list[OutlierSample]) -> OutlierBatch:
    return OutlierBatch(
        embeddings=torch.from_numpy(np.stack([s.embedding for s in samples]).astype(np.float32)),
        latents=torch.from_numpy(np.stack([s.latent for s in samples]).astype(np.float32)),
        classes=torch.tensor([s.cls for s in samples], dtype=torch.int64),
        keys=tuple(s.key for s in samples),
    )


@dataclass
class OutlierStats:
    """Counts a run records: samples read, batches handed out, shards skipped, pipeline restarts."""

    samples: int = 0
    batches: int = 0
    skipped: int = 0
    restarts: int = 0
    errors: list[str] = field(default_factory=list)


class OutlierSource(Protocol):
    """Anything that yields exactly `steps_per_epoch` batches of `batch_size` outliers per epoch."""

    batch_size: int
    steps_per_epoch: int
    stats: OutlierStats

    @property
    def latent_shape(self) -> tuple[int, int, int]: ...

    @property
    def embed_dim(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[OutlierBatch]: ...


def shard_urls(shard_dir: Path) -> list[str]:
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise ConfigError(f"shards: {shard_dir} is not a directory")
    urls = [str(path) for path in list_shards(shard_dir)]
    if not urls:
        raise ConfigError(f"shards: no outliers-*.tar files in {shard_dir}")
    return urls


def _first_sample(urls: list[str], on_bad_shard: str) -> OutlierSample:
    for sample in iter_outlier_samples(urls, on_error=on_bad_shard, stats=ReadStats()):
        return sample
    raise ShardError(f"no readable outlier sample in {len(urls)} shards", shard=urls[0])


class OutlierStream:
    """Outliers streamed from shards: resampled with a seeded shuffle, `batch_size` per step.

    Each epoch builds fresh pipelines seeded by (seed, epoch, rank, reader), so a run resumed at an
    epoch boundary draws the same outliers, and ranks draw different ones. With `workers` > 0 the
    shards are read and decoded in DataLoader worker processes (tar parsing is pure Python and costs
    about as much as a student step on 2 cores); worker w makes steps w, w + W, ... of the epoch and
    the loader hands them out in step order. Should a pipeline run dry (every shard skipped, or fewer
    samples than asked), it is rebuilt; no readable sample at all raises ShardError.
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
        self.shard_dir = Path(shard_dir)
        self.urls = shard_urls(self.shard_dir)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.on_bad_shard = on_bad_shard
        self.rank = rank
        self.workers = workers
        self._totals = OutlierStats()
        first = _first_sample(self.urls, on_bad_shard)
        self._latent_shape = tuple(int(d) for d in first.latent.shape)
        self._embed_dim = int(first.embedding.shape[0])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self._latent_shape  # type: ignore[return-value]

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

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
            return replace(collate_outliers(samples), reader=delta)

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


class InMemoryOutliers:
    """Every outlier loaded once into tensors; batches drawn by a seeded permutation per epoch.

    Same interface as OutlierStream, for data that fits in memory (4x8x8 latents: 1 KB each) and to
    measure what streaming costs.
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
        self.shard_dir = Path(shard_dir)
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.stats = OutlierStats()
        read_stats = ReadStats()
        samples = list(iter_outlier_samples(shard_urls(self.shard_dir), on_error=on_bad_shard, stats=read_stats))
        self.stats.skipped = read_stats.skipped
        self.stats.errors = list(read_stats.errors)
        if not samples:
            raise ShardError(f"no readable outlier samples in {self.shard_dir}")
        self.data = collate_outliers(samples)
        logger.info("Loaded %d outliers from %s into memory", len(self.data), self.shard_dir)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.data.latents.shape[1:])  # type: ignore[return-value]

    @property
    def embed_dim(self) -> int:
        return int(self.data.embeddings.shape[1])

    def epoch(self, epoch: int) -> Iterator[OutlierBatch]:
        generator = seeded_generator(self.seed, "outliers", epoch, self.rank)
        total = len(self.data)
        order = torch.randperm(total, generator=generator)
        position = 0
        for _ in range(self.steps_per_epoch):
            if position + self.batch_size > total:
                # Fewer outliers than one epoch needs: draw a new permutation and go on.
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


def reduce_latents(latents: torch.Tensor, mode: str) -> torch.Tensor:
    """f_ood of SPEC stage D, (B, C, H, W) -> (B, F): flatten (F = CHW) or mean_ch_h (mean over C, H)."""
    if mode == "flatten":
        return latents.flatten(1)
    if mode == "mean_ch_h":
        # The reference reduces SD's 4x64x64 latents to 64 numbers this way.
        return latents.mean(dim=(1, 2))
    raise ConfigError(f"latent_reduce must be flatten or mean_ch_h, got {mode!r}")


def reduced_latent_dim(latent_shape: tuple[int, int, int], mode: str) -> int:
    c, h, w = latent_shape
    return c * h * w if mode == "flatten" else w
