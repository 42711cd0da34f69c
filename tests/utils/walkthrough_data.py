"""The folder benchmark the README walkthrough test writes: a few hundred small PNGs and a TOML file.

Class folders are named with words the tiny-random tokenizer knows (it learned Fashion-MNIST's
class names), so `oal-train embed` and `oal-synth register-sd` take the names from the folders,
as they would for a user's own data with real Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.utils.folder_benchmark import class_image, to_toml, write_png

WALKTHROUGH_CLASSES = ("bag", "dress", "sneaker")


def write_walkthrough_benchmark(
    data_dir: Path, *, train_per_class: int = 60, test_per_class: int = 20, ood_images: int = 40, size: int = 32
) -> Path:
    """data_dir/photos/{train,test}/<class>/, photos/near/ and photos/far/, and data_dir/photos.toml."""
    rng = np.random.default_rng(0)
    root = Path(data_dir) / "photos"
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(WALKTHROUGH_CLASSES):
            for index in range(count):
                write_png(root / split / name / f"{index:04d}.png", class_image(rng, label, size, 3))
    for index in range(ood_images):
        # Near: the ID colours with the pattern flipped top-to-bottom and rotated (close, not a class).
        write_png(root / "near" / f"{index:04d}.png", np.rot90(class_image(rng, index % 3, size, 3)).copy())
        write_png(root / "far" / f"{index:04d}.png", rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    spec = {
        "name": "photos",
        "image_size": size,
        "channels": 3,
        "id_train": {"folder": "photos/train"},
        "id_test": {"folder": "photos/test"},
        "near": [{"folder": "photos/near", "name": "photos-near"}],
        "far": [{"folder": "photos/far", "name": "photos-noise"}],
    }
    path = Path(data_dir) / "photos.toml"
    path.write_text(to_toml(spec), encoding="utf-8")
    return path
