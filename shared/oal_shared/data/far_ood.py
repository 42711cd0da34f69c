"""Far-OOD image sets for the 28x28 grey benchmark, made offline and deterministically.

Every set is generated from data bundled in installed packages (scikit-learn's digits,
scikit-image's sample images) or from a seeded generator, so the same bytes come out on every
machine with the same library versions. Results are cached per process and read-only.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from oal_shared.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28  # pixels, the side of every image made here
FAR_OOD_SEED = 2406_16525  # fixed: the arXiv id of the paper; each set derives its own stream from it

# scikit-image sample images that ship inside the package (no download). `horse` is left out: it is a
# binary silhouette, so most crops of it are a flat colour rather than a texture. brick, grass and
# gravel are bundled too and are real textures.
TEXTURE_SOURCES = (
    "camera",
    "astronaut",
    "coins",
    "moon",
    "chelsea",
    "coffee",
    "text",
    "brick",
    "grass",
    "gravel",
)
NUM_TEXTURES = 2000
TEXTURE_MIN_SIDE = IMAGE_SIZE  # pixels; crops range from this up to half the source's shorter side

NOISE_PER_KIND = 1000  # Gaussian, uniform and blobs each
BLOB_SIGMA_RANGE = (1.5, 4.0)  # pixels, std of the Gaussian that smooths white noise into blobs

# ITU-R BT.601 luma weights, to turn RGB sample images grey.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def resize_bilinear(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize a 2-D float image to (size, size) with Pillow's bilinear filter (antialiased when shrinking)."""
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (size, size), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


@lru_cache(maxsize=1)
def digits() -> np.ndarray:
    """All 1797 scikit-learn digits, 8x8 -> 28x28 bilinear, 0..16 scaled to 0..255: uint8 (1797, 28, 28)."""
    images = sklearn_digit_images()  # (1797, 8, 8), values 0..16
    resized = np.stack([resize_bilinear(image * (255.0 / 16.0)) for image in images])
    return _as_frozen_uint8(resized)


def sklearn_digit_images() -> np.ndarray:
    """The images of `sklearn.datasets.load_digits()`, float64 (1797, 8, 8) in 0..16.

    Read straight from the CSV that load_digits itself reads, because importing sklearn.datasets
    costs about a second, half the time of building fmnist-osr; load_digits is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    locations = spec.submodule_search_locations if spec is not None else None
    csv_path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if csv_path is not None and csv_path.is_file():
        table = np.loadtxt(csv_path, delimiter=",")  # (1797, 65): 64 pixels, then the label
        return table[:, :-1].reshape(-1, 8, 8)
    from sklearn.datasets import load_digits

    return load_digits().images


@lru_cache(maxsize=1)
def textures() -> np.ndarray:
    """2000 grey crops, random places and scales, of scikit-image's bundled photos: uint8 (2000, 28, 28)."""
    rng = np.random.default_rng([FAR_OOD_SEED, 1])
    sources = [_grey_sample_image(name) for name in TEXTURE_SOURCES]
    crops = np.empty((NUM_TEXTURES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for index in range(NUM_TEXTURES):
        # Round robin over sources so each one contributes the same number of crops.
        source = sources[index % len(sources)]
        height, width = source.shape
        side = int(rng.integers(TEXTURE_MIN_SIDE, min(height, width) // 2 + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crops[index] = resize_bilinear(source[top : top + side, left : left + side])
    return _as_frozen_uint8(crops)


@lru_cache(maxsize=1)
def noise() -> np.ndarray:
    """3000 images: 1000 Gaussian, 1000 uniform, 1000 smoothed blobs, in that order: uint8 (3000, 28, 28)."""
    from scipy.ndimage import gaussian_filter  # scipy comes with scikit-learn and scikit-image

    rng = np.random.default_rng([FAR_OOD_SEED, 2])
    shape = (NOISE_PER_KIND, IMAGE_SIZE, IMAGE_SIZE)
    gaussian = rng.normal(127.5, 64.0, size=shape)  # mean and std in grey levels
    uniform = rng.uniform(0.0, 256.0, size=shape)
    white = rng.standard_normal(size=shape)
    sigmas = rng.uniform(*BLOB_SIGMA_RANGE, size=NOISE_PER_KIND)
    blobs = np.stack(
        [gaussian_filter(field, sigma, mode="wrap") for field, sigma in zip(white, sigmas, strict=True)]
    )
    # Stretch each blob image to the full grey range, so blobs differ in shape, not in contrast.
    low = blobs.min(axis=(1, 2), keepdims=True)
    high = blobs.max(axis=(1, 2), keepdims=True)
    blobs = (blobs - low) / (high - low) * 255.0
    return _as_frozen_uint8(np.concatenate([gaussian, np.floor(uniform), blobs]))


FAR_OOD_SETS: dict[str, Callable[[], np.ndarray]] = {"digits": digits, "textures": textures, "noise": noise}


def load_far_ood(name: str) -> np.ndarray:
    """The far-OOD set called `name` (one of FAR_OOD_SETS)."""
    make = FAR_OOD_SETS.get(name)
    if make is None:
        raise ConfigError(f"far-OOD set must be one of {sorted(FAR_OOD_SETS)}, got {name!r}")
    return make()


def _grey_sample_image(name: str) -> np.ndarray:
    """A scikit-image sample image as float32 grey (H, W) in 0..255."""
    from skimage import data as sample_images

    image = np.asarray(getattr(sample_images, name)())
    if image.dtype == bool:
        image = image.astype(np.float32) * 255.0
    if image.ndim == 3:
        image = image[..., :3].astype(np.float32) @ LUMA_WEIGHTS  # (H, W, 3) -> (H, W)
    return image.astype(np.float32)


def _as_frozen_uint8(images: np.ndarray) -> np.ndarray:
    out = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    out.flags.writeable = False  # cached and shared: nobody may change it in place
    return out
