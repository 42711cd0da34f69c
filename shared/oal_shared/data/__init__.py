"""Data sets of the benchmarks: Fashion-MNIST, fmnist-osr, CIFAR in OpenOOD layout, and benchmark
files describing your own image folders or lists (`folder_spec.py`, `folder.py`).

Importing this package is cheap: scikit-learn, scikit-image, scipy and torchvision are imported
only when a set that needs them is built.
"""

from oal_shared.data.benchmark import (
    BENCHMARKS,
    FMNIST_OSR,
    FMNIST_OSR_ID_CLASSES,
    FMNIST_OSR_NEAR_CLASSES,
    OOD_LABEL,
    Benchmark,
    ImageSet,
    is_benchmark_file,
    is_ood,
    load_benchmark,
)
from oal_shared.data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist
from oal_shared.data.idx import read_idx
from oal_shared.data.image_files import ImageFiles, read_image, take_images
from oal_shared.errors import DataFormatError

__all__ = [
    "BENCHMARKS",
    "FMNIST_CLASSES",
    "FMNIST_OSR",
    "FMNIST_OSR_ID_CLASSES",
    "FMNIST_OSR_NEAR_CLASSES",
    "OOD_LABEL",
    "Benchmark",
    "DataFormatError",
    "ImageFiles",
    "ImageSet",
    "is_benchmark_file",
    "is_ood",
    "load_benchmark",
    "load_fashion_mnist",
    "read_idx",
    "read_image",
    "take_images",
]
