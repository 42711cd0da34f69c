"""A tiny OpenOOD v1.5 data directory (image lists + PNGs) for the CIFAR loaders, written into tmp_path.

ID images are random RGB 32x32 PNGs (lossless, so a test can compare pixels exactly). Each OOD
set's images have one constant grey level and the size and mode its real data set has (MNIST
28x28 grey, Tiny ImageNet 64x64, textures non-square...), so the resize path is exercised too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from oal_shared.data.cifar import CIFAR_LAYOUTS, IMAGES_DIR, imglist_path

# (width, height, PIL mode) of each stand-in OOD set, after the real sets' shapes.
OOD_IMAGE_FORMATS = {
    "cifar10": (32, 32, "RGB"),
    "cifar100": (32, 32, "RGB"),
    "tin": (64, 64, "RGB"),
    "mnist": (28, 28, "L"),
    "svhn": (32, 32, "RGB"),
    "texture": (96, 64, "RGB"),
    "places365": (48, 40, "RGB"),
}


@dataclass
class CifarStandIn:
    """What was written, so tests can compare what the loader returns with it."""

    data_dir: Path
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    ood_counts: dict[str, int] = field(default_factory=dict)
    ood_levels: dict[str, int] = field(default_factory=dict)  # the constant grey level of each OOD set


def write_cifar_standin(
    data_dir: Path,
    benchmark: str = "cifar10",
    classes: tuple[int, ...] = (0, 1, 2),
    per_class: int = 2,
    ood_per_set: int = 3,
    skip_sets: tuple[str, ...] = (),
    seed: int = 0,
) -> CifarStandIn:
    """Write a stand-in of `benchmark` under `data_dir`; OOD sets named in `skip_sets` get no list."""
    rng = np.random.default_rng(seed)
    layout = CIFAR_LAYOUTS[benchmark]

    def write_id(split: str) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        lines = []
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            relative = f"{benchmark}/{split}/{layout.class_names[label]}/{index:04d}.png"
            _save(data_dir / IMAGES_DIR / relative, Image.fromarray(image))
            lines.append(f"{relative} {label}")
        _write_list(imglist_path(data_dir, benchmark, split, benchmark), lines)
        return images, labels

    train_images, train_labels = write_id("train")
    test_images, test_labels = write_id("test")
    standin = CifarStandIn(data_dir, train_images, train_labels, test_images, test_labels)
    for set_index, set_name in enumerate(layout.near + layout.far):
        if set_name in skip_sets:
            continue
        width, height, mode = OOD_IMAGE_FORMATS[set_name]
        level = 20 + 30 * set_index  # distinct per set
        lines = []
        for index in range(ood_per_set):
            relative = f"{set_name}/test/{index:04d}.png"
            image = Image.new(mode, (width, height), color=_fill(mode, level))
            _save(data_dir / IMAGES_DIR / relative, image)
            lines.append(f"{relative} -1")  # OpenOOD labels OOD lines -1
        _write_list(imglist_path(data_dir, benchmark, "test", set_name), lines)
        standin.ood_counts[set_name] = ood_per_set
        standin.ood_levels[set_name] = level
    return standin


def _fill(mode: str, level: int) -> int | tuple[int, int, int]:
    return level if mode == "L" else (level, level, level)


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _write_list(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
