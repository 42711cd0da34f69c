"""Build a Benchmark from a benchmark file (`folder_spec.py`): your image folders or image lists.

Class folders are found with torchvision's ImageFolder helpers (`find_classes`, `make_dataset`,
`IMG_EXTENSIONS`), so a tree that `torchvision.datasets.ImageFolder` reads gives the same classes,
files and order here. Nothing is decoded to build the benchmark except the images its mean/std
are computed from: every set holds `ImageFiles`, decoded when sliced (the trainer streams them
through DataLoader workers, or holds a small set whole).

Before anything trains, every file is opened and checked (`PIL.Image.verify`, which catches
truncated and corrupt PNGs without decoding), every resolved path must lie inside the data root
(a symlink out of it is refused), and without `image_size` every image must have one square size.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from oal_shared.data.cifar import read_imglist
from oal_shared.data.folder_spec import (
    BenchmarkFile,
    ImageSource,
    class_folders,
    list_root,
    read_benchmark_file,
    source_path,
)
from oal_shared.data.image_files import ImageFiles
from oal_shared.data.types import OOD_LABEL, Benchmark, ImageSet, channel_stats
from oal_shared.errors import ConfigError, DataFormatError, DataNotFoundError, UnsafePathError
from oal_shared.paths import safe_join

logger = logging.getLogger(__name__)

__all__ = ["load_folder_benchmark"]


def load_folder_benchmark(path: Path, data_dir: Path) -> Benchmark:
    """The benchmark a benchmark file describes, built once per process, file version and data root."""
    path = Path(path).resolve()
    return _load_folder_benchmark(path, path.stat().st_mtime_ns, Path(data_dir).resolve())


@dataclass
class _Listed:
    """The files of one image set before they are checked; labels row-aligned."""

    key: str  # where it sits in the benchmark file: id_train, near[0], ...
    name: str
    kind: str
    paths: list[str]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)


@lru_cache(maxsize=2)
def _load_folder_benchmark(path: Path, mtime_ns: int, data_dir: Path) -> Benchmark:
    del mtime_ns  # part of the cache key only: an edited file is read again
    spec = read_benchmark_file(path)
    builder = _Builder(spec, data_dir, path)
    class_names, train = builder.id_set("id_train", spec.id_train, None)
    _, test = builder.id_set("id_test", spec.id_test, class_names)
    name = spec.name or path.stem
    train.name, test.name = f"{name}-train", f"{name}-test"
    near = [builder.ood_set(f"near[{i}]", source, "near") for i, source in enumerate(spec.near)]
    far = [builder.ood_set(f"far[{i}]", source, "far") for i, source in enumerate(spec.far)]
    listed = [train, test, *near, *far]
    builder.check_files(listed)
    size = builder.image_size()
    sets = [_image_set(item, size, spec.channels) for item in listed]
    if spec.mean is not None and spec.std is not None:
        mean, std = spec.mean, spec.std
    else:
        mean, std = channel_stats(sets[0].images)
    benchmark = Benchmark(
        name=name,
        class_names=class_names,
        id_train=sets[0],
        id_test=sets[1],
        near=tuple(sets[2 : 2 + len(near)]),
        far=tuple(sets[2 + len(near) :]),
        mean=tuple(mean),
        std=tuple(std),
    )
    counts = ", ".join(f"{s.name} {len(s)}" for s in sets)
    logger.info("Benchmark %s from %s: %d classes, %dx%d, %s images", name, path, len(class_names), size, size, counts)
    return benchmark


def _image_set(item: _Listed, size: int, channels: int) -> ImageSet:
    labels = np.asarray(item.labels, dtype=np.int64)
    labels.flags.writeable = False
    files = ImageFiles(item.paths, size, channels)
    return ImageSet(item.name, item.kind, files, labels, skipped_files=tuple(item.skipped))  # type: ignore[arg-type]


class _Builder:
    """Lists, confines and checks the files of each set a benchmark file names."""

    def __init__(self, spec: BenchmarkFile, data_dir: Path, bench_path: Path):
        self.spec, self.data_dir, self.bench_path = spec, data_dir, bench_path
        self.sizes: dict[tuple[int, int], str] = {}  # each image size seen -> the first file of that size

    def fail(self, key: str, message: str, error: type[Exception] = DataFormatError) -> Exception:
        return error(f"benchmark file {self.bench_path}: {key}: {message}")

    def id_set(
        self, key: str, source: ImageSource, class_names: tuple[str, ...] | None
    ) -> tuple[tuple[str, ...], _Listed]:
        if source.folder is not None:
            return self._id_folder(f"{key}.folder", source, class_names)
        paths, labels = self._list_entries(f"{key}.list", source)
        names = class_names or self.spec.class_names or tuple(f"class_{i}" for i in range(max(labels) + 1))
        for line, label in enumerate(labels, start=1):
            if not 0 <= label < len(names):
                raise self.fail(f"{key}.list", f"line {line}: label {label} is outside 0..{len(names) - 1}")
        return tuple(names), _Listed(key, key, "id", paths, labels)

    def _id_folder(
        self, key: str, source: ImageSource, class_names: tuple[str, ...] | None
    ) -> tuple[tuple[str, ...], _Listed]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        folder = source_path(self.data_dir, source, key, self.bench_path)
        found = class_folders(folder)
        if class_names is None:
            if len(found) < 2:
                raise self.fail(key, f"{folder} needs at least 2 class sub-folders, found {found}", ConfigError)
            class_names = tuple(found)
        elif tuple(found) != class_names:
            missing = sorted(set(class_names) - set(found))
            extra = sorted(set(found) - set(class_names))
            raise self.fail(
                key, f"{folder} must have id_train's class sub-folders; missing {missing}, extra {extra}", ConfigError
            )
        class_to_idx = {name: index for index, name in enumerate(class_names)}
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        per_class = Counter(label for _, label in samples)
        empty = [name for name, index in class_to_idx.items() if per_class[index] == 0]
        if empty:
            listed = ", ".join(str(folder / name) for name in empty)
            raise self.fail(
                key,
                f"class folder(s) {listed} hold no images (extensions {', '.join(IMG_EXTENSIONS)})",
                DataNotFoundError,
            )
        paths, labels = [p for p, _ in samples], [label for _, label in samples]
        return class_names, _Listed(key.removesuffix(".folder"), key, "id", paths, labels)

    def ood_set(self, key: str, source: ImageSource, kind: str) -> _Listed:
        if source.folder is not None:
            paths = self._ood_folder(f"{key}.folder", source)
        else:
            paths, _ = self._list_entries(f"{key}.list", source)
        return _Listed(key, source.default_name(), kind, paths, [OOD_LABEL] * len(paths))

    def _ood_folder(self, key: str, source: ImageSource) -> list[str]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        folder = source_path(self.data_dir, source, key, self.bench_path)
        paths = []
        for parent, dirs, files in os.walk(folder, followlinks=True):
            dirs.sort()  # walk order, hence set order, is the same on every machine
            paths += [os.path.join(parent, f) for f in sorted(files) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
        if not paths:
            raise self.fail(
                key, f"{folder} holds no images (extensions {', '.join(IMG_EXTENSIONS)})", DataNotFoundError
            )
        return paths

    def _list_entries(self, key: str, source: ImageSource) -> tuple[list[str], list[int]]:
        list_path = source_path(self.data_dir, source, key, self.bench_path)
        root = list_root(self.data_dir, source, key.removesuffix(".list"), self.bench_path)
        entries = read_imglist(list_path)
        if not entries:
            raise self.fail(key, f"{list_path} names no images")
        paths = []
        for line, (relative, _) in enumerate(entries, start=1):
            try:
                image_path = safe_join(root, relative)
            except UnsafePathError as exc:
                raise self.fail(key, f"{list_path} line {line}: {exc}", UnsafePathError) from None
            if not image_path.is_file():
                raise self.fail(key, f"{list_path} line {line}: image {image_path} does not exist", DataNotFoundError)
            paths.append(str(image_path))
        return paths, [label for _, label in entries]

    def check_files(self, listed: list[_Listed]) -> None:
        """Every file inside the data root and readable; unreadable ones are fatal or skipped (on_bad_image)."""
        root = str(self.data_dir)
        for item in listed:
            keep_paths, keep_labels = [], []
            for path, label in zip(item.paths, item.labels, strict=True):
                real = os.path.realpath(path)
                if not (real == root or real.startswith(root + os.sep)):
                    raise self.fail(
                        item.key, f"{path} resolves to {real}, outside the data root {root}", UnsafePathError
                    )
                problem = self._read_header(real)
                if problem is None:
                    keep_paths.append(path)
                    keep_labels.append(label)
                    continue
                if self.spec.on_bad_image == "raise":
                    raise self.fail(
                        item.key,
                        f'image {path} cannot be read ({problem}); fix or remove it, or set on_bad_image = "skip"',
                    )
                logger.warning("%s: skipping unreadable image %s (%s)", item.key, path, problem)
                item.skipped.append(path)
            if item.skipped:
                logger.warning("%s: %d unreadable image(s) skipped", item.key, len(item.skipped))
            if not keep_paths:
                raise self.fail(item.key, "no readable images left")
            item.paths, item.labels = keep_paths, keep_labels

    def _read_header(self, path: str) -> str | None:
        """None when the file is a whole image (its size recorded), else what is wrong with it."""
        try:
            with Image.open(path) as image:
                size = image.size
                image.verify()  # checks the data (PNG CRCs, truncation) without decoding the pixels
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        self.sizes.setdefault(size, path)
        return None

    def image_size(self) -> int:
        """The side every image is brought to: `image_size`, else the one square size all images share."""
        if self.spec.image_size is not None:
            return self.spec.image_size
        if len(self.sizes) > 1:
            examples = "; ".join(f"{w}x{h} ({path})" for (w, h), path in list(self.sizes.items())[:3])
            raise self.fail(
                "image_size",
                f"images come in {len(self.sizes)} sizes, e.g. {examples}; set image_size to resize them to one",
            )
        ((width, height),) = self.sizes
        if width != height:
            raise self.fail(
                "image_size", f"images are {width}x{height}, not square; set image_size to resize and centre-crop them"
            )
        return width
