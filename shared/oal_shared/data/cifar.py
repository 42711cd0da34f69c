"""CIFAR-10/100 benchmarks read from a data directory in the OpenOOD v1.5 layout.

    <data_dir>/benchmark_imglist/<cifar10|cifar100>/{train,test}_<id>.txt   ID splits (required)
    <data_dir>/benchmark_imglist/<id>/test_<ood>.txt                      OOD sets (skipped if absent)
    <data_dir>/images_classic/<relative path named in a list>             the images

Each list line is `relative/path.png label`. Images are decoded with Pillow, converted to RGB and
brought to 32x32 the way OpenOOD's test transform does it (shorter side to 32, bilinear, centre crop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from oal_shared.data.image_files import read_image
from oal_shared.data.types import OOD_LABEL, Benchmark, ImageSet, channel_stats
from oal_shared.errors import ConfigError, DataFormatError, DataNotFoundError
from oal_shared.paths import safe_join

logger = logging.getLogger(__name__)

CIFAR_IMAGE_SIZE = 32  # pixels
IMGLIST_DIR = "benchmark_imglist"
IMAGES_DIR = "images_classic"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100 fine labels in label-index order (alphabetical, as in the data set's meta file).
CIFAR100_CLASSES = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
    crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split()
)


@dataclass(frozen=True)
class CifarLayout:
    """Which image lists make up one OpenOOD v1.5 CIFAR benchmark."""

    class_names: tuple[str, ...]
    near: tuple[str, ...]
    far: tuple[str, ...]


FAR_SETS = ("mnist", "svhn", "texture", "places365")
CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(CIFAR10_CLASSES, near=("cifar100", "tin"), far=FAR_SETS),
    "cifar100": CifarLayout(CIFAR100_CLASSES, near=("cifar10", "tin"), far=FAR_SETS),
}


def imglist_path(data_dir: Path, benchmark: str, split: str, set_name: str) -> Path:
    """Path of an OpenOOD image list, e.g. benchmark_imglist/cifar10/test_tin.txt."""
    return Path(data_dir) / IMGLIST_DIR / benchmark / f"{split}_{set_name}.txt"


def load_cifar_benchmark(name: str, data_dir: Path) -> Benchmark:
    """The `cifar10` or `cifar100` benchmark from `data_dir`, cached per process and resolved data_dir."""
    if name not in CIFAR_LAYOUTS:
        raise ConfigError(f"CIFAR benchmark must be one of {sorted(CIFAR_LAYOUTS)}, got {name!r}")
    return _load_cifar_benchmark(name, Path(data_dir).resolve())


@lru_cache(maxsize=2)
def _load_cifar_benchmark(name: str, data_dir: Path) -> Benchmark:
    layout = CIFAR_LAYOUTS[name]
    images_root = data_dir / IMAGES_DIR
    num_classes = len(layout.class_names)

    def id_set(split: str) -> ImageSet:
        path = imglist_path(data_dir, name, split, name)
        if not path.is_file():
            raise DataNotFoundError(f"{name} {split} image list {path} does not exist (OpenOOD v1.5 layout expected)")
        return load_image_list(path, images_root, f"{name}-{split}", "id", num_classes)

    def ood_sets(kind: str, set_names: tuple[str, ...]) -> tuple[ImageSet, ...]:
        found = []
        for set_name in set_names:
            path = imglist_path(data_dir, name, "test", set_name)
            if not path.is_file():
                logger.warning("%s: %s-OOD set %s skipped, its image list %s is missing", name, kind, set_name, path)
                continue
            found.append(load_image_list(path, images_root, set_name, kind, num_classes))
        return tuple(found)

    id_train = id_set("train")
    mean, std = channel_stats(id_train.images)
    return Benchmark(
        name=name,
        class_names=layout.class_names,
        id_train=id_train,
        id_test=id_set("test"),
        near=ood_sets("near", layout.near),
        far=ood_sets("far", layout.far),
        mean=mean,
        std=std,
    )


def read_imglist(path: Path) -> list[tuple[str, int]]:
    """(relative image path, label) per non-blank line of an OpenOOD image list."""
    entries = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        tokens = line.strip().split(maxsplit=1)
        if len(tokens) != 2:
            raise DataFormatError(f"{path} line {line_number}: expected 'relative/path.png label', got {line!r}")
        try:
            label = int(tokens[1])
        except ValueError:
            raise DataFormatError(f"{path} line {line_number}: label {tokens[1]!r} is not an integer") from None
        entries.append((tokens[0], label))
    return entries


def load_image_list(path: Path, images_root: Path, name: str, kind: str, num_classes: int) -> ImageSet:
    """Decode every image a list names into uint8 (N, 32, 32, 3); OOD sets get label OOD_LABEL throughout."""
    entries = read_imglist(path)
    if not entries:
        raise DataFormatError(f"image list {path} names no images")
    images = np.empty((len(entries), CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE, 3), dtype=np.uint8)  # (N, H, W, 3)
    labels = np.empty(len(entries), dtype=np.int64)
    for index, (relative, label) in enumerate(entries):
        # Lists come from outside: a line may not point out of the image folder.
        image_path = safe_join(images_root, relative)
        if not image_path.is_file():
            raise DataNotFoundError(f"{path} line {index + 1}: image {image_path} does not exist")
        images[index] = read_image_32(image_path)
        if kind == "id" and not 0 <= label < num_classes:
            raise DataFormatError(f"{path} line {index + 1}: ID label {label} is outside 0..{num_classes - 1}")
        labels[index] = label if kind == "id" else OOD_LABEL
    images.flags.writeable = False
    labels.flags.writeable = False
    logger.info("%s: %d images from %s", name, len(entries), path)
    return ImageSet(name, kind, images, labels)  # type: ignore[arg-type]


def read_image_32(path: Path) -> np.ndarray:
    """One image as uint8 (32, 32, 3): RGB, shorter side resized to 32 (bilinear), centre-cropped."""
    return read_image(path, CIFAR_IMAGE_SIZE, 3)
