"""Images that stay on disk until they are read: `ImageFiles` decodes on access, like a uint8 array.

A folder benchmark of 50,000 64x64 RGB images is 2.4 GB as float32 tensors; held whole it grows
the trainer with the data set. `ImageFiles` holds only the file paths (one numpy string array, so
forked DataLoader workers share its pages instead of copying refcounted Python objects) and
decodes with Pillow when indexed: `files[i]` is one image, `files[a:b]` or `files[rows]` a uint8
stack, `files.subset(rows)` a smaller ImageFiles that decodes nothing. `shape`, `ndim`, `dtype`
and `len()` read as the decoded array's would, so code written for arrays keeps working.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from oal_shared.errors import DataFormatError

__all__ = ["ImageFiles", "read_image", "take_images"]


def read_image(path: Path | str, size: int | None, channels: int) -> np.ndarray:
    """One image as uint8 (H, W) grey or (H, W, 3) RGB.

    With `size`, an image of another size has its shorter side resized to `size` (bilinear) and is
    centre-cropped to (size, size), the way OpenOOD's test transform does it.
    """
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as opened:
            image = opened.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(f"image {path} cannot be decoded: {exc}") from exc
    width, height = image.size
    if size is not None and (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, resample=Image.Resampling.BILINEAR)
        left = (new_size[0] - size) // 2
        top = (new_size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


class ImageFiles:
    """N image files read as uint8 (N, S, S) grey or (N, S, S, 3) RGB, decoded when indexed."""

    dtype = np.dtype(np.uint8)

    def __init__(self, paths: Sequence[str] | np.ndarray, size: int, channels: int):
        if channels not in (1, 3):
            raise DataFormatError(f"channels must be 1 or 3, got {channels}")
        self.paths = np.asarray(paths, dtype=np.str_)  # (N,) fixed-width strings, no per-item objects
        self.paths.flags.writeable = False
        self.size = int(size)
        self.channels = int(channels)

    @property
    def shape(self) -> tuple[int, ...]:
        base = (len(self.paths), self.size, self.size)
        return base if self.channels == 1 else (*base, 3)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the decoded uint8 images would take."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return read_image(str(self.paths[key]), self.size, self.channels)
        selected = self.paths[key]
        out = np.empty((len(selected), *self.shape[1:]), dtype=np.uint8)
        for index, path in enumerate(selected):
            out[index] = read_image(str(path), self.size, self.channels)
        return out

    def subset(self, rows: np.ndarray | Sequence[int]) -> ImageFiles:
        """The files at `rows`, still on disk."""
        return ImageFiles(self.paths[np.asarray(rows, dtype=np.int64)], self.size, self.channels)

    def fingerprint(self) -> str:
        """sha256 of the paths, each file's size and mtime, the size and channels: changes when the data does."""
        digest = hashlib.sha256(f"image-files-v1/{self.size}/{self.channels}/{len(self)}/".encode())
        for path in self.paths:
            stat = os.stat(str(path))
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, {self.size}x{self.size}, {self.channels} channel(s))"


def take_images(images: np.ndarray | ImageFiles, rows: np.ndarray) -> np.ndarray | ImageFiles:
    """Rows of an image array, or of image files without decoding them."""
    return images.subset(rows) if isinstance(images, ImageFiles) else images[rows]
