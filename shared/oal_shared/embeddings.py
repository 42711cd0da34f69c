"""Embedding sets: ID class embeddings in a generator's conditioning space, stored as safetensors.

An embedding set is Stage A's output (docs/METHOD.md, Stage A: ID embeddings): per ID class c the
vectors E_c, all in one conditioning space. The space id travels with the vectors so the generator
can refuse a set made for another model. Files are safetensors (never pickles):

    tensors   "embeddings" float32 (N, D), "labels" int64 (N,)
    metadata  "space", "class_names" (JSON list), "source" (may be empty); "schema_version" ("1")

A file without "schema_version" is read as the current version: the key exists so a later format
can be told apart, and a client writing version 1 by hand need not know about it. We always write it.

This module imports numpy and safetensors only: the API process validates uploads with it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _safetensors_load
from safetensors.numpy import save as _safetensors_save

from oal_shared.errors import EmbeddingSetError
from oal_shared.fsio import atomic_write_bytes

__all__ = [
    "EMBEDDING_SCHEMA_VERSION",
    "EmbeddingSet",
    "embedding_set_from_bytes",
    "embedding_set_to_bytes",
    "load_embedding_set",
    "save_embedding_set",
]

EMBEDDING_SCHEMA_VERSION = 1
TENSOR_KEYS = ("embeddings", "labels")
METADATA_KEYS = ("schema_version", "space", "class_names", "source")
#: Metadata an upload must carry; a missing schema_version means the current one.
REQUIRED_METADATA_KEYS = ("space", "class_names", "source")


@dataclass(frozen=True)
class EmbeddingSet:
    """Vectors of ID classes in one conditioning space; every field is checked on construction."""

    embeddings: np.ndarray  # (N, D) float32, finite
    labels: np.ndarray  # (N,) int64 in [0, len(class_names))
    space: str  # conditioning-space id, e.g. "fmnist-ldm/cond-v1"
    class_names: tuple[str, ...]
    source: str = ""  # free-text provenance: which model and images made the vectors

    def __post_init__(self) -> None:
        if isinstance(self.class_names, list):
            object.__setattr__(self, "class_names", tuple(self.class_names))
        _check_embeddings(self.embeddings)
        _check_class_names(self.class_names)
        _check_labels(self.labels, num_rows=self.embeddings.shape[0], num_classes=len(self.class_names))
        if not isinstance(self.space, str) or not self.space.strip():
            raise EmbeddingSetError(f"space: expected a non-empty conditioning-space id, got {self.space!r}")
        if not isinstance(self.source, str):
            raise EmbeddingSetError(f"source: expected a string, got {type(self.source).__name__}")

    @property
    def dim(self) -> int:
        """D, the length of one conditioning embedding."""
        return int(self.embeddings.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def for_class(self, cls: int) -> np.ndarray:
        """The rows of class `cls`, (N_c, D); (0, D) when the class has no rows."""
        if not 0 <= cls < self.num_classes:
            raise EmbeddingSetError(f"class index: expected 0 <= cls < {self.num_classes}, got {cls}")
        return self.embeddings[self.labels == cls]

    def content_id(self) -> str:
        """sha256 hex over a canonical encoding of every field.

        Not the hash of the file: safetensors writes its metadata in no fixed order, so two saves
        of one set may differ in bytes while this id stays the same.
        """
        header = {
            "schema_version": EMBEDDING_SCHEMA_VERSION,
            "space": self.space,
            "class_names": list(self.class_names),
            "source": self.source,
            "shape": list(self.embeddings.shape),
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        digest.update(np.ascontiguousarray(self.embeddings, dtype="<f4").tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return digest.hexdigest()


def _check_embeddings(embeddings: object) -> None:
    if not isinstance(embeddings, np.ndarray):
        raise EmbeddingSetError(f"embeddings: expected a numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise EmbeddingSetError(f"embeddings: expected 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if embeddings.dtype != np.float32:
        raise EmbeddingSetError(f"embeddings: expected float32, got {embeddings.dtype}")
    num_rows, dim = embeddings.shape
    if num_rows < 1 or dim < 1:
        raise EmbeddingSetError(
            f"embeddings: expected N >= 1 rows and D >= 1 columns, got shape ({num_rows}, {dim})"
        )
    bad = ~np.isfinite(embeddings)
    if bad.any():
        first_row = int(np.argwhere(bad)[0, 0])
        raise EmbeddingSetError(f"embeddings: {int(bad.sum())} non-finite values (first at row {first_row})")


def _check_class_names(class_names: object) -> None:
    if not isinstance(class_names, tuple) or not class_names:
        raise EmbeddingSetError(f"class_names: expected a non-empty list of names, got {class_names!r}")
    for index, name in enumerate(class_names):
        if not isinstance(name, str) or not name.strip():
            raise EmbeddingSetError(f"class_names: entry {index} must be a non-empty string, got {name!r}")
    if len(set(class_names)) != len(class_names):
        duplicates = sorted({name for name in class_names if class_names.count(name) > 1})
        raise EmbeddingSetError(f"class_names: names must be distinct, repeated: {duplicates}")


def _check_labels(labels: object, num_rows: int, num_classes: int) -> None:
    if not isinstance(labels, np.ndarray):
        raise EmbeddingSetError(f"labels: expected a numpy array, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise EmbeddingSetError(f"labels: expected 1-D (N,), got shape {tuple(labels.shape)}")
    if labels.dtype != np.int64:
        raise EmbeddingSetError(f"labels: expected int64, got {labels.dtype}")
    if labels.shape[0] != num_rows:
        raise EmbeddingSetError(f"labels: {labels.shape[0]} labels for {num_rows} embeddings")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        row = int(np.argmax(outside))
        raise EmbeddingSetError(
            f"labels: values must lie in [0, {num_classes}) for {num_classes} class names, "
            f"got {int(labels[row])} at row {row} ({int(outside.sum())} out of range)"
        )


def embedding_set_to_bytes(es: EmbeddingSet) -> bytes:
    """The safetensors file content of `es`."""
    tensors = {
        "embeddings": np.ascontiguousarray(es.embeddings),
        "labels": np.ascontiguousarray(es.labels),
    }
    metadata = {
        "schema_version": str(EMBEDDING_SCHEMA_VERSION),
        "space": es.space,
        "class_names": json.dumps(list(es.class_names)),
        "source": es.source,
    }
    return _safetensors_save(tensors, metadata=metadata)


def embedding_set_from_bytes(data: bytes, name: str = "upload") -> EmbeddingSet:
    """Parse and validate safetensors bytes; every error message starts with `name`."""
    data = bytes(data)  # accepts bytearray/memoryview; the header reader needs bytes
    try:
        tensors = _safetensors_load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise EmbeddingSetError(f"{name}: not a readable safetensors file ({exc})") from exc
    metadata = _read_metadata(data, name)

    missing = [key for key in TENSOR_KEYS if key not in tensors]
    if missing:
        raise EmbeddingSetError(f"{name}: tensor {missing[0]!r} is missing (found {sorted(tensors)})")
    unexpected = sorted(set(tensors) - set(TENSOR_KEYS))
    if unexpected:
        raise EmbeddingSetError(
            f"{name}: unexpected tensors {unexpected}; only {list(TENSOR_KEYS)} belong here"
        )
    missing = [key for key in REQUIRED_METADATA_KEYS if key not in metadata]
    if missing:
        raise EmbeddingSetError(
            f"{name}: metadata key {missing[0]!r} is missing (required: {', '.join(REQUIRED_METADATA_KEYS)})"
        )
    schema_version = metadata.get("schema_version", str(EMBEDDING_SCHEMA_VERSION))
    if schema_version != str(EMBEDDING_SCHEMA_VERSION):
        raise EmbeddingSetError(
            f"{name}: metadata schema_version is {schema_version!r}, this version reads {EMBEDDING_SCHEMA_VERSION}"
        )
    try:
        class_names = json.loads(metadata["class_names"])
    except json.JSONDecodeError as exc:
        raise EmbeddingSetError(f"{name}: metadata class_names is not a JSON list ({exc})") from exc
    if not isinstance(class_names, list):
        raise EmbeddingSetError(
            f"{name}: metadata class_names must be a JSON list, got {type(class_names).__name__}"
        )

    try:
        return EmbeddingSet(
            embeddings=tensors["embeddings"],
            labels=tensors["labels"],
            space=metadata["space"],
            class_names=tuple(class_names),
            source=metadata["source"],
        )
    except EmbeddingSetError as exc:
        raise EmbeddingSetError(f"{name}: {exc}") from exc


def _read_metadata(data: bytes, name: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (8-byte little-endian length, then JSON).

    safetensors' numpy loader drops the metadata, so we read the documented header ourselves;
    `data` has already passed safetensors' own parser when this runs.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise EmbeddingSetError(f"{name}: safetensors __metadata__ must be a mapping")
    return metadata


def save_embedding_set(es: EmbeddingSet, path: str | Path) -> Path:
    """Write `es` to `path` atomically (temp file in the same folder, fsync, rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, embedding_set_to_bytes(es))
    return path


def load_embedding_set(path: str | Path) -> EmbeddingSet:
    """Read and validate an embedding-set file; any problem raises EmbeddingSetError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EmbeddingSetError(f"{path}: cannot read embedding set ({exc.strerror or exc})") from exc
    return embedding_set_from_bytes(data, name=str(path))
