"""A tiny folder benchmark written by the tests: PNG class folders, OOD folders and a benchmark file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("circle", "square", "stripe")


def class_image(rng: np.random.Generator, label: int, size: int, channels: int) -> np.ndarray:
    """A noisy image whose mean colour and pattern depend on the class, so a small net can learn it."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 160.0
    base[:, : size // 2 if label == 1 else size // 4] += 60.0
    image = np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8)
    return image[..., 0] if channels == 1 else image


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_folder_benchmark(
    data_dir: Path,
    *,
    train_per_class: int = 20,
    test_per_class: int = 8,
    ood_images: int = 12,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    file_format: str = "toml",
    extra: dict | None = None,
    folder: str = "shapes",
) -> Path:
    """data_dir/<folder>/{train,test}/<class>/*.png, near/ and far/ folders, and the benchmark file."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / folder
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASS_NAMES):
            for index in range(count):
                write_png(root / split / name / f"{index:04d}.png", class_image(rng, label, size, channels))
    for kind in ("near", "far"):
        for index in range(ood_images):
            noise = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            write_png(root / kind / f"sub{index % 2}" / f"{index:04d}.png", noise[..., 0] if channels == 1 else noise)
    spec = {
        "name": folder,
        "channels": channels,
        "id_train": {"folder": f"{folder}/train"},
        "id_test": {"folder": f"{folder}/test"},
        "near": [{"folder": f"{folder}/near"}],
        "far": [{"folder": f"{folder}/far", "name": f"{folder}-noise"}],
        **(extra or {}),
    }
    path = Path(data_dir) / f"{folder}.{file_format}"
    path.write_text(to_toml(spec) if file_format == "toml" else json.dumps(spec))
    return path


def to_toml(spec: dict) -> str:
    """The few TOML forms a benchmark file needs: scalars and lists at the top, then tables."""
    lines, tables = [], []
    for key, value in spec.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in value.items()))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables.append(f"[[{key}]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in item.items()))
        else:
            lines.append(f"{key} = {json.dumps(value)}\n")
    return "".join(lines) + "\n" + "\n".join(tables)
