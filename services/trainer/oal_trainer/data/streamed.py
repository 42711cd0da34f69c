"""ID images decoded where they are used: in DataLoader worker processes, one batch at a time.

A set too large to hold as float32 tensors (`OAL_ID_IN_MEMORY_MAX_MB`) becomes `StreamedImages`:
a map-style Dataset over the benchmark's uint8 images (an array, or `ImageFiles` on disk) that
decodes and standardises image i when asked. The seeded sampler of `id_loader` picks the order,
so the order, and the bytes of every batch, are those of the in-memory path; only where the
decoding happens changes. `uint8_batches` does the same for evaluation and the teacher cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oal_shared.data.image_files import ImageFiles

__all__ = ["StreamedImages", "as_is", "image_batches", "to_model_input", "uint8_batches"]


def to_model_input(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 (N, C, H, W), scaled to [0, 1] and standardised."""
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # astype copies: benchmarks are read-only
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class StreamedImages(Dataset):
    """Rows `rows` of uint8 `images`, item i decoded and standardised to float32 (C, H, W) on access.

    Reads like the in-memory tensor where the trainer needs it: len(), `shape` (N, C, H, W),
    `fingerprint()` in place of hashing the tensor's bytes (teacher and feature caches).
    """

    def __init__(
        self,
        images: np.ndarray | ImageFiles,
        rows: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        workers: int = 0,
    ):
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.mean, self.std = tuple(mean), tuple(std)
        self.workers = workers  # decoding processes when a caller asks for none

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, height, width, *rest = self.images.shape
        return (len(self), rest[0] if rest else 1, height, width)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[int(self.rows[index])]  # (H, W) or (H, W, 3) uint8
        return to_model_input(image[None], self.mean, self.std)[0]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A whole batch (B, C, H, W) at once: DataLoader workers call this instead of B __getitem__s.

        Standardising the stack runs the same element-wise float32 operations as one image at a
        time, so the values are the same to the bit; it only saves B-1 rounds of small torch calls.
        """
        return to_model_input(self.images[self.rows[np.asarray(indices, dtype=np.int64)]], self.mean, self.std)

    def fingerprint(self) -> str:
        """sha256 of what the items are made of: the source images, the rows, mean and std."""
        if isinstance(self.images, ImageFiles):
            source = self.images.fingerprint()
        else:
            source = hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()
        digest = hashlib.sha256(f"streamed-v1/{source}/{self.mean}/{self.std}/".encode())
        digest.update(self.rows.tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every item in row order, (B, C, H, W) per batch, decoded by `workers` processes."""
        yield from DataLoader(self, batch_size=batch_size, shuffle=False, num_workers=self.workers, collate_fn=as_is)


class _Chunks(Dataset):
    """Item i is the uint8 stack images[i*B : (i+1)*B], decoded in a worker."""

    def __init__(self, images: ImageFiles, batch_size: int):
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index * self.batch_size : (index + 1) * self.batch_size]


def as_is(batch: Any) -> Any:
    """The collate function of datasets that fetch whole batches (`__getitems__`): nothing to stack."""
    return batch


def uint8_batches(images: np.ndarray | ImageFiles, batch_size: int, num_workers: int = 0) -> Iterator[np.ndarray]:
    """uint8 batches of `images` in order; files on disk are decoded by `num_workers` processes."""
    if not isinstance(images, ImageFiles) or num_workers == 0:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
        return
    yield from DataLoader(_Chunks(images, batch_size), batch_size=None, num_workers=num_workers, collate_fn=as_is)


def image_batches(images: torch.Tensor | StreamedImages, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, C, H, W) batches in row order from a held tensor or from streamed images."""
    if isinstance(images, StreamedImages):
        yield from images.batches(batch_size)
        return
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]
