"""Fashion-MNIST from local IDX files, found in a fixed order; torchvision's download only when allowed."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from oal_shared.data.idx import read_idx
from oal_shared.errors import ConfigError, DataFormatError, DataNotFoundError
from oal_shared.settings import DEBIAN_FMNIST_DIR, Settings, get_settings

logger = logging.getLogger(__name__)

FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FMNIST_IMAGE_SIZE = 28
SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# Where torchvision.datasets.FashionMNIST(root=data_dir) puts the unzipped IDX files.
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"

Split = Literal["train", "test"]


def split_file_names(split: Split) -> tuple[str, str]:
    """Base names (without `.gz`) of the images and labels file of `split`."""
    prefix = _FILE_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def fmnist_search_dirs(settings: Settings) -> list[Path]:
    """Folders searched, in order: OAL_FMNIST_DIR, data_dir/fashion-mnist, Debian's, torchvision's."""
    dirs = [] if settings.fmnist_dir is None else [Path(settings.fmnist_dir)]
    dirs += [
        Path(settings.data_dir) / "fashion-mnist",
        DEBIAN_FMNIST_DIR,
        Path(settings.data_dir) / TORCHVISION_SUBDIR,
    ]
    return dirs


def find_split_files(directory: Path, split: Split) -> tuple[Path, Path] | None:
    """(images, labels) paths of `split` in `directory`, raw preferred over `.gz`; None unless both exist."""
    found = []
    for base in split_file_names(split):
        candidates = [directory / base, directory / f"{base}.gz"]
        match = next((path for path in candidates if path.is_file()), None)
        if match is None:
            return None
        found.append(match)
    return found[0], found[1]


def locate_fashion_mnist(split: Split, settings: Settings) -> tuple[Path, Path]:
    """Find the IDX files of `split`; download them first if nothing is found and downloads are allowed."""
    dirs = fmnist_search_dirs(settings)
    for directory in dirs:
        files = find_split_files(directory, split)
        if files is not None:
            return files
    download_note = "."
    if settings.allow_download:
        try:
            directory = _download_with_torchvision(Path(settings.data_dir))
        except DataNotFoundError as exc:
            download_note = f" (it is set, but {exc})."
        else:
            files = find_split_files(directory, split)
            if files is not None:
                return files
            download_note = f" (it is set, but the download left no IDX files in {directory})."
    images_name, labels_name = split_file_names(split)
    data_dir = Path(settings.data_dir)
    tried = ", ".join(str(directory) for directory in dirs)
    raise DataNotFoundError(
        f"Fashion-MNIST {split} split not found: no folder holds both {images_name}[.gz] and "
        f"{labels_name}[.gz]. Tried: {tried}. Get it one of three ways: "
        f"(1) `sudo apt-get install dataset-fashion-mnist` (installs into {DEBIAN_FMNIST_DIR}); "
        f"(2) put the IDX files in a folder and set OAL_FMNIST_DIR to it "
        f"(or use {data_dir / 'fashion-mnist'}); "
        f"(3) set OAL_ALLOW_DOWNLOAD=1 to let torchvision download it into {data_dir}{download_note}"
    )


def load_fashion_mnist(split: Split, settings: Settings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of `split`; read-only arrays cached per process."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    settings = settings if settings is not None else get_settings()
    images_path, labels_path = locate_fashion_mnist(split, settings)
    return read_fashion_mnist_files(images_path.resolve(), labels_path.resolve())


@lru_cache(maxsize=8)
def read_fashion_mnist_files(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one split's IDX pair; cached by path, so pass resolved paths."""
    images = read_idx(images_path)  # (N, 28, 28)
    labels = read_idx(labels_path)  # (N,)
    expected = (FMNIST_IMAGE_SIZE, FMNIST_IMAGE_SIZE)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != expected:
        raise DataFormatError(
            f"{images_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataFormatError(
            f"{labels_path}: expected {images.shape[0]} labels (one per image), got shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(FMNIST_CLASSES)):
        raise DataFormatError(f"{labels_path}: labels must lie in 0..{len(FMNIST_CLASSES) - 1}")
    # Shared by every caller in the process: nobody may change them in place.
    images.flags.writeable = False
    labels.flags.writeable = False
    logger.info("Fashion-MNIST: %d images from %s", images.shape[0], images_path)
    return images, labels


def _download_with_torchvision(data_dir: Path) -> Path:
    """Let torchvision fetch Fashion-MNIST into `data_dir`; returns the folder with the IDX files."""
    logger.info("Fashion-MNIST: downloading with torchvision into %s (OAL_ALLOW_DOWNLOAD is set)", data_dir)
    try:
        from torchvision.datasets import FashionMNIST  # lazy: torchvision costs seconds to import

        FashionMNIST(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - network, disk and mirror failures all mean "not downloaded"
        raise DataNotFoundError(f"the torchvision download into {data_dir} failed: {exc}") from exc
    return data_dir / TORCHVISION_SUBDIR
