"""The data-set types every benchmark builds: ImageSet, Benchmark, and the OOD label rule.

Kept apart from the registry (`benchmark.py`) and the builders (`fmnist_osr.py`, `cifar.py`), so
builders import the types and the registry imports the builders, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from oal_shared.data.image_files import ImageFiles
from oal_shared.errors import ConfigError

__all__ = ["OOD_LABEL", "SET_KINDS", "STATS_MAX_IMAGES", "Benchmark", "ImageSet", "channel_stats", "is_ood"]

OOD_LABEL = -1  # label of every OOD image; ID labels are class indices 0..C-1
SET_KINDS = ("id", "near", "far")


def is_ood(labels: np.ndarray | int) -> np.ndarray:
    """True where a label marks an OOD image (a negative label), the one place that rule is written."""
    return np.asarray(labels) < 0


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value, compare sets by identity
class ImageSet:
    """Images uint8 (N, H, W) grey or (N, H, W, 3) RGB; labels int64 (N,), class index or OOD_LABEL.

    `images` is an array in memory, or `ImageFiles` that decode when sliced (folder benchmarks).
    `skipped_files` names the files left out because they could not be read (on_bad_image = "skip").
    """

    name: str
    kind: Literal["id", "near", "far"]
    images: np.ndarray | ImageFiles
    labels: np.ndarray
    skipped_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SET_KINDS:
            raise ConfigError(f"ImageSet {self.name!r}: kind must be one of {SET_KINDS}, got {self.kind!r}")
        images, labels = self.images, self.labels
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if images.dtype != np.uint8 or not (images.ndim == 3 or rgb):
            raise ConfigError(
                f"ImageSet {self.name!r}: images must be uint8 (N, H, W) or (N, H, W, 3), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
            raise ConfigError(
                f"ImageSet {self.name!r}: labels must be int64 ({images.shape[0]},), got {labels.dtype} {labels.shape}"
            )
        ood = is_ood(labels)
        if self.kind == "id" and ood.any():
            raise ConfigError(f"ImageSet {self.name!r}: an 'id' set has {int(ood.sum())} OOD labels")
        if self.kind != "id" and not ood.all():
            raise ConfigError(f"ImageSet {self.name!r}: a {self.kind!r} set must label every image {OOD_LABEL}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def on_disk(self) -> bool:
        """True when the images are decoded from files on access rather than held."""
        return isinstance(self.images, ImageFiles)


@dataclass(frozen=True, eq=False)
class Benchmark:
    """An ID data set and its OOD sets; `mean`/`std` are per-channel stats of id_train in [0, 1] units."""

    name: str
    class_names: tuple[str, ...]
    id_train: ImageSet
    id_test: ImageSet
    near: tuple[ImageSet, ...]
    far: tuple[ImageSet, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for field_name, sets, kind in (
            ("id_train", (self.id_train,), "id"),
            ("id_test", (self.id_test,), "id"),
            ("near", self.near, "near"),
            ("far", self.far, "far"),
        ):
            for image_set in sets:
                if image_set.kind != kind:
                    raise ConfigError(
                        f"Benchmark {self.name!r}: {field_name} holds {image_set.name!r} of kind "
                        f"{image_set.kind!r}, expected {kind!r}"
                    )
                if image_set.images.shape[1:] != self.id_train.images.shape[1:]:
                    raise ConfigError(
                        f"Benchmark {self.name!r}: {field_name} set {image_set.name!r} has images of shape "
                        f"{image_set.images.shape[1:]}, id_train has {self.id_train.images.shape[1:]}"
                    )
        for field_name in ("id_train", "id_test"):
            labels = getattr(self, field_name).labels
            if labels.size and labels.max() >= self.num_classes:
                raise ConfigError(
                    f"Benchmark {self.name!r}: {field_name} has label {int(labels.max())} "
                    f"but only {self.num_classes} class_names"
                )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ConfigError(f"Benchmark {self.name!r}: mean and std need {self.in_channels} values (one per channel)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return 1 if self.id_train.images.ndim == 3 else 3

    @property
    def image_size(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self.id_train.images.shape[1])

    def ood_sets(self) -> tuple[ImageSet, ...]:
        """Near sets, then far sets."""
        return self.near + self.far


STATS_MAX_IMAGES = 10_000  # images on disk: mean/std from at most this many, evenly spaced
STATS_CHUNK = 1_000  # images decoded per step while summing


def channel_stats(images: np.ndarray | ImageFiles) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units.

    Sums of x and x^2 are exact in unsigned integers (uint8^2 fits uint16), so this needs no
    float copy of the whole set: std = sqrt(E[x^2] - E[x]^2). Images on disk are read in chunks,
    at most STATS_MAX_IMAGES of them, evenly spaced over the set (exact below that many).
    """
    total = int(images.shape[0])
    if isinstance(images, ImageFiles) and total > STATS_MAX_IMAGES:
        rows = np.linspace(0, total - 1, STATS_MAX_IMAGES).round().astype(np.int64)
    else:
        rows = np.arange(total)
    num_channels = 1 if images.ndim == 3 else images.shape[-1]
    sums = np.zeros(num_channels, dtype=np.uint64)
    squares = np.zeros(num_channels, dtype=np.uint64)
    for start in range(0, rows.size, STATS_CHUNK):
        if isinstance(images, ImageFiles):
            chunk = images[rows[start : start + STATS_CHUNK]]
        else:  # arrays: contiguous slices, no fancy-index copy of the whole set
            chunk = images[start : start + STATS_CHUNK]
        channels = chunk[..., None] if chunk.ndim == 3 else chunk  # (n, H, W, C)
        for channel in range(num_channels):
            values = channels[..., channel]
            sums[channel] += values.sum(dtype=np.uint64)
            squares[channel] += np.square(values, dtype=np.uint16).sum(dtype=np.uint64)
    count = rows.size * int(np.prod(images.shape[1:3]))
    means, stds = [], []
    for channel in range(num_channels):
        mean = int(sums[channel]) / count
        mean_square = int(squares[channel]) / count
        means.append(mean / 255.0)
        stds.append(float(np.sqrt(max(mean_square - mean**2, 0.0))) / 255.0)
    return tuple(means), tuple(stds)
