"""fmnist-osr (docs/METHOD.md, The embedded benchmark): Fashion-MNIST split into 6 ID classes and 4
near-OOD classes, with deterministic far-OOD sets; runs offline from Debian's Fashion-MNIST.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from oal_shared.data.far_ood import FAR_OOD_SETS, load_far_ood
from oal_shared.data.fashion_mnist import FMNIST_CLASSES, locate_fashion_mnist, read_fashion_mnist_files
from oal_shared.data.types import OOD_LABEL, Benchmark, ImageSet, channel_stats
from oal_shared.settings import Settings

FMNIST_OSR = "fmnist-osr"
FMNIST_OSR_ID_CLASSES = (0, 1, 2, 3, 7, 8)  # T-shirt/top, Trouser, Pullover, Dress, Sneaker, Bag
FMNIST_OSR_NEAR_CLASSES = (4, 5, 6, 9)  # Coat, Sandal, Shirt, Ankle boot


def load_fmnist_osr(settings: Settings) -> Benchmark:
    """fmnist-osr from the Fashion-MNIST files `settings` locate, built once per process and files."""
    # Key the cache by the files actually read, so a different OAL_FMNIST_DIR gives a fresh benchmark.
    train_files = tuple(path.resolve() for path in locate_fashion_mnist("train", settings))
    test_files = tuple(path.resolve() for path in locate_fashion_mnist("test", settings))
    return _fmnist_osr(train_files, test_files)


@lru_cache(maxsize=4)
def _fmnist_osr(train_files: tuple[Path, Path], test_files: tuple[Path, Path]) -> Benchmark:
    train_images, train_labels = read_fashion_mnist_files(*train_files)
    test_images, test_labels = read_fashion_mnist_files(*test_files)
    id_train = _id_subset("fmnist-id-train", train_images, train_labels)
    id_test = _id_subset("fmnist-id-test", test_images, test_labels)
    near_mask = np.isin(test_labels, FMNIST_OSR_NEAR_CLASSES)
    near = ImageSet("fmnist-near", "near", _frozen(test_images[near_mask]), _ood_labels(int(near_mask.sum())))
    far = tuple(_far_set(set_name) for set_name in FAR_OOD_SETS)
    mean, std = channel_stats(id_train.images)
    return Benchmark(
        name=FMNIST_OSR,
        class_names=tuple(FMNIST_CLASSES[c] for c in FMNIST_OSR_ID_CLASSES),
        id_train=id_train,
        id_test=id_test,
        near=(near,),
        far=far,
        mean=mean,
        std=std,
    )


def _id_subset(name: str, images: np.ndarray, labels: np.ndarray) -> ImageSet:
    """Images of the ID classes, labels remapped to 0..5 in FMNIST_OSR_ID_CLASSES order."""
    remap = np.full(len(FMNIST_CLASSES), OOD_LABEL, dtype=np.int64)
    remap[list(FMNIST_OSR_ID_CLASSES)] = np.arange(len(FMNIST_OSR_ID_CLASSES))
    mask = np.isin(labels, FMNIST_OSR_ID_CLASSES)
    return ImageSet(name, "id", _frozen(images[mask]), _frozen(remap[labels[mask]]))


def _far_set(name: str) -> ImageSet:
    images = load_far_ood(name)
    return ImageSet(name, "far", images, _ood_labels(len(images)))


def _ood_labels(count: int) -> np.ndarray:
    return _frozen(np.full(count, OOD_LABEL, dtype=np.int64))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # benchmarks are cached and shared within the process
    return array
