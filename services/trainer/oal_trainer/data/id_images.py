"""ID images for the fit loop: normalised tensors, seeded subsets and loaders, batch augmentation.

The benchmark's uint8 images become float tensors (B, C, H, W) standardised with the benchmark's
mean/std. A set whose float32 tensors fit `in_memory_max_bytes` (`OAL_ID_IN_MEMORY_MAX_MB`; the
Fashion-MNIST ID train is 36k x 784 floats, 113 MB) is held whole; a larger one is streamed
(`streamed.StreamedImages`: decoded and standardised in DataLoader worker processes), so memory
does not grow with the data set. Either way a DataLoader whose order is fixed by (seed, epoch)
serves the same batches. Augmentation (random crop with padding, flip) runs on whole batches with
its own (seed, epoch) generator, so an epoch replays exactly on resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, TensorDataset

from oal_shared.data.image_files import take_images
from oal_shared.errors import ConfigError
from oal_trainer.data.seeds import derive_seed, seeded_generator
from oal_trainer.data.streamed import StreamedImages, as_is, to_model_input

if TYPE_CHECKING:
    from oal_shared.data.benchmark import Benchmark, ImageSet

logger = logging.getLogger(__name__)

FLOAT32_BYTES = 4


def subset_indices(total: int, limit: int | None, seed: int, name: str) -> np.ndarray:
    """Sorted indices of a seeded random subset of `limit` items (all when limit is None or >= total)."""
    if limit is None or limit >= total:
        return np.arange(total)
    rng = np.random.default_rng(derive_seed(seed, "subset", name))
    return np.sort(rng.choice(total, size=limit, replace=False))


@dataclass(frozen=True, eq=False)
class IDTrainSet:
    """The ID training images the run uses; `images[i]` is image `source_index[i]` of the benchmark.

    `images` is the held (N, C, H, W) float32 tensor, or `StreamedImages` giving the same items
    decoded on access.
    """

    images: torch.Tensor | StreamedImages  # (N, C, H, W) float32, standardised
    labels: torch.Tensor  # (N,) int64
    source_index: np.ndarray  # (N,) int64, rows of benchmark.id_train

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def streamed(self) -> bool:
        return isinstance(self.images, StreamedImages)


def id_train_set(
    benchmark: Benchmark,
    subset: int | None,
    seed: int,
    *,
    in_memory_max_bytes: int | None = None,
    stream_workers: int = 0,
) -> IDTrainSet:
    """The run's ID training rows, held as tensors when they fit `in_memory_max_bytes` (None: always)."""
    rows = subset_indices(len(benchmark.id_train), subset, seed, benchmark.id_train.name)
    labels = torch.from_numpy(np.asarray(benchmark.id_train.labels[rows], dtype=np.int64))
    side = benchmark.image_size
    tensor_bytes = rows.size * benchmark.in_channels * side * side * FLOAT32_BYTES
    source = benchmark.id_train.images
    where = "files on disk" if benchmark.id_train.on_disk else "a uint8 array"
    if in_memory_max_bytes is None or tensor_bytes <= in_memory_max_bytes:
        images: torch.Tensor | StreamedImages = to_model_input(source[rows], benchmark.mean, benchmark.std)
        choice = "held in memory"
    else:
        images = StreamedImages(source, rows, benchmark.mean, benchmark.std, workers=stream_workers)
        choice = f"streamed by DataLoader workers (at least {stream_workers})"
    limit = "no limit" if in_memory_max_bytes is None else f"limit {in_memory_max_bytes / 2**20:.0f} MB"
    logger.info(
        "ID train %s: %d images from %s, %.0f MB as float32 tensors (%s): %s",
        benchmark.id_train.name,
        rows.size,
        where,
        tensor_bytes / 2**20,
        limit,
        choice,
    )
    return IDTrainSet(images, labels, rows.astype(np.int64))


def slice_benchmark(benchmark: Benchmark, per_set: int | None, seed: int) -> Benchmark:
    """The benchmark with every evaluation set cut to a seeded subset of `per_set` images (smoke runs)."""
    if per_set is None:
        return benchmark

    def cut(image_set: ImageSet) -> ImageSet:
        rows = subset_indices(len(image_set), per_set, seed, image_set.name)
        return replace(image_set, images=take_images(image_set.images, rows), labels=image_set.labels[rows])

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
    Streamed images are decoded by `num_workers` processes, or the set's own `workers` when 0;
    the worker count changes where images are decoded, never which batches come out.
    """
    if len(train) // world_size < batch_size:
        raise ConfigError(
            f"batch_size: {batch_size} is more than the {len(train) // world_size} ID images per rank; "
            "lower batch_size or raise train_subset"
        )
    dataset: Dataset
    if isinstance(train.images, StreamedImages):
        dataset, collate = _LabelledRows(train.images, train.labels), as_is
        num_workers = num_workers or train.images.workers
    else:
        dataset, collate = TensorDataset(train.images, train.labels, torch.arange(len(train))), None
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
        collate_fn=collate,
        generator=seeded_generator(seed, "loader", epoch, rank),
    )


class _LabelledRows(Dataset):
    """(image, label, row) per row of streamed images, the items TensorDataset gives for held ones."""

    def __init__(self, images: StreamedImages, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index], torch.tensor(index)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole batch in one call (decoded in the worker); the loader's collate passes it on as is."""
        rows = torch.as_tensor(indices, dtype=torch.int64)
        return self.images.__getitems__(indices), self.labels[rows], rows


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
