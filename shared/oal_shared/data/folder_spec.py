"""The benchmark file: a small TOML or JSON file that describes a benchmark made of your own images.

    name = "my-photos"              # optional; default: the file's stem
    image_size = 64                 # optional: resize (shorter side, bilinear) and centre-crop to 64x64
    channels = 3                    # 1 (grey) or 3 (RGB); images are converted
    on_bad_image = "raise"          # or "skip": an unreadable image is named, left out and counted
    # class_names = [...]           # only for image lists; folders name their classes

    [id_train]
    folder = "photos/train"         # one sub-folder per class (torchvision's ImageFolder layout)
    [id_test]
    folder = "photos/test"          # the same class sub-folders
    [[near]]                        # any number of near-OOD sets
    folder = "photos/near"          # every image below it, in any sub-folder
    [[far]]
    list = "lists/test_svhn.txt"    # or an OpenOOD image list: `relative/path.png label` lines
    root = "images_classic"         # where a list's paths start (default: the data root)

Every path is relative to the data root (`OAL_DATA_DIR`) and may not leave it. This module reads
and checks the file only (no torch, no image decoding), so the API can check a job's
`embeddings.benchmark` at the door; `folder.py` builds the Benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from oal_shared.errors import ConfigError, DataNotFoundError, UnsafePathError
from oal_shared.paths import ensure_within, safe_join

__all__ = [
    "BENCHMARK_FILE_SUFFIXES",
    "BenchmarkFile",
    "ImageSource",
    "check_sources",
    "class_names_of",
    "is_benchmark_file",
    "read_benchmark_file",
    "resolve_benchmark_file",
]

BENCHMARK_FILE_SUFFIXES = (".toml", ".json")
RESERVED_SET_NAMES = ("near", "far")  # metric keys of the per-kind means in metrics.json

RelativePath = Annotated[str, Field(min_length=1, max_length=1000)]


class ImageSource(BaseModel):
    """One image set: a folder, or an image list whose paths start at `root`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: RelativePath | None = Field(None, description="Folder below the data root.")
    list: RelativePath | None = Field(None, description="OpenOOD image list below the data root.")
    root: RelativePath | None = Field(None, description="Where a list's paths start (default: the data root).")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = Field(
        None, description="Set name in metrics (default: the folder's or list's name)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ImageSource:
        if (self.folder is None) == (self.list is None):
            raise ValueError("needs exactly one of the keys folder or list")
        if self.root is not None and self.list is None:
            raise ValueError("root applies to a list only")
        return self

    def default_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.folder is not None:  # the whole relative path: "photos/near" and "other/near" stay apart
            return "-".join(Path(self.folder).parts)
        return Path(self.list).stem.removeprefix("test_").removeprefix("train_")  # type: ignore[arg-type]


class BenchmarkFile(BaseModel):
    """The checked contents of a benchmark file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = None
    image_size: StrictInt | None = Field(None, ge=8, le=1024, description="Square side images are brought to.")
    channels: Literal[1, 3] = 3
    on_bad_image: Literal["raise", "skip"] = "raise"
    class_names: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(None, min_length=2)
    mean: tuple[float, ...] | None = None
    std: tuple[Annotated[float, Field(gt=0)], ...] | None = None
    id_train: ImageSource
    id_test: ImageSource
    near: tuple[ImageSource, ...] = ()
    far: tuple[ImageSource, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkFile:
        if not self.near and not self.far:
            raise ValueError("needs at least one OOD set: a [[near]] or [[far]] table")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{key} needs {self.channels} value(s), one per channel, got {len(values)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together, or neither (then they are computed from id_train)")
        if self.class_names is not None and self.id_train.folder is not None:
            raise ValueError("class_names applies to image lists; a folder names its classes by its sub-folders")
        names = [s.default_name() for s in (*self.near, *self.far)]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(f"OOD set names must be unique; {doubles} appear more than once (set `name`)")
        reserved = sorted(set(names) & set(RESERVED_SET_NAMES))
        if reserved:
            raise ValueError(f"OOD set names {reserved} are reserved for the near/far means (set `name`)")
        return self


def is_benchmark_file(name: str) -> bool:
    """True when a benchmark value names a file (.toml or .json) rather than a built-in benchmark."""
    return str(name).lower().endswith(BENCHMARK_FILE_SUFFIXES)


def resolve_benchmark_file(name: str | Path, data_dir: Path, *, confined: bool) -> Path:
    """Where the benchmark file `name` is.

    confined (a job's `embeddings.benchmark`, anything from outside): a path relative to the data
    root that stays inside it. Otherwise (the trainer's own command line): as given, else below
    the data root.
    """
    text = os.fspath(name)
    if confined:
        path = safe_join(Path(data_dir), text)
    else:
        given = Path(text).expanduser()
        path = given if given.is_file() or given.is_absolute() else Path(data_dir) / given
    if not path.is_file():
        raise DataNotFoundError(f"benchmark file {text} does not exist (looked at {path})")
    return path


def read_benchmark_file(path: Path) -> BenchmarkFile:
    """Parse and check a benchmark file; ConfigError names the file and each key that is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"benchmark file {path}: not valid {path.suffix.lstrip('.').upper()} ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"benchmark file {path}: must hold a table of keys, got {type(raw).__name__}")
    try:
        return BenchmarkFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(top level)"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{key}: {message}")
        raise ConfigError(f"benchmark file {path}: " + "; ".join(problems)) from None


def source_path(data_dir: Path, source: ImageSource, key: str, bench_path: Path) -> Path:
    """The folder or list of `source`, inside the data root; errors name the key and the file."""
    relative = source.folder if source.folder is not None else source.list
    try:
        path = safe_join(Path(data_dir), relative)  # type: ignore[arg-type]
    except UnsafePathError as exc:
        raise UnsafePathError(f"benchmark file {bench_path}: {key}: {exc}") from None
    exists = path.is_dir() if source.folder is not None else path.is_file()
    if not exists:
        what = "folder" if source.folder is not None else "image list"
        raise DataNotFoundError(f"benchmark file {bench_path}: {key}: {what} {path} does not exist")
    return path


def list_root(data_dir: Path, source: ImageSource, key: str, bench_path: Path) -> Path:
    """Where the paths of an image list start: `root` below the data root, else the data root."""
    try:
        root = safe_join(Path(data_dir), source.root) if source.root else ensure_within(data_dir, data_dir)
    except UnsafePathError as exc:
        raise UnsafePathError(f"benchmark file {bench_path}: {key}.root: {exc}") from None
    return root


def class_folders(folder: Path) -> list[str]:
    """Sub-folder names in sorted order: the class names, as torchvision's ImageFolder finds them."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def check_sources(spec: BenchmarkFile, data_dir: Path, bench_path: Path) -> None:
    """Every folder, list and list root the file names exists inside the data root (no image read)."""
    named = [("id_train", spec.id_train), ("id_test", spec.id_test)]
    named += [(f"near[{i}]", source) for i, source in enumerate(spec.near)]
    named += [(f"far[{i}]", source) for i, source in enumerate(spec.far)]
    for key, source in named:
        source_path(data_dir, source, f"{key}.folder" if source.folder is not None else f"{key}.list", bench_path)
        if source.list is not None:
            root = list_root(data_dir, source, key, bench_path)
            if not root.is_dir():
                raise DataNotFoundError(f"benchmark file {bench_path}: {key}.root: folder {root} does not exist")


def class_names_of(spec: BenchmarkFile, data_dir: Path, bench_path: Path) -> tuple[str, ...]:
    """The benchmark's class names without reading an image (what the API needs at the door)."""
    train = source_path(
        data_dir, spec.id_train, "id_train.folder" if spec.id_train.folder else "id_train.list", bench_path
    )
    if spec.id_train.folder is not None:
        names = class_folders(train)
        if len(names) < 2:
            raise ConfigError(
                f"benchmark file {bench_path}: id_train.folder: {train} needs at least 2 class sub-folders, "
                f"found {len(names)}"
            )
        return tuple(names)
    if spec.class_names is not None:
        return spec.class_names
    from oal_shared.data.cifar import read_imglist  # numpy and Pillow only

    labels = [label for _, label in read_imglist(train)]
    if not labels:
        raise ConfigError(f"benchmark file {bench_path}: id_train.list: {train} names no images")
    return tuple(f"class_{index}" for index in range(max(labels) + 1))
