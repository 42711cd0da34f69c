"""What one outlier sample is: its fields, member names, key rules and the schema version.

One rule (`sample_problem`) checks a sample's fields, on the write path and the read path alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from oal_shared.errors import ManifestError, ShardError

SHARD_SCHEMA_VERSION = 1  # of a sample's members and provenance
SHARD_PATTERN = "outliers-%06d.tar"
MANIFEST_NAME = "manifest.json"
SAMPLE_MEMBERS = ("latent.npy", "emb.npy", "cls", "json")

# WebDataset groups tar members into samples by the text before the first dot of the file name,
# so a key must hold no dot; we also keep slashes and other surprises out of file names.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
SHARD_NAME_PATTERN = re.compile(r"^outliers-(\d{6,})\.tar$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
LATENT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass(frozen=True)
class OutlierSample:
    """One synthesised outlier as stored in a shard; checked on construction."""

    key: str  # sample id inside the shard: letters, digits, '_' and '-' only (no dots, no slashes)
    latent: np.ndarray  # (C, H, W) float16 | float32, unscaled z0
    embedding: np.ndarray  # (D,) float32, the conditioning embedding that produced the latent
    cls: int  # source ID class
    meta: dict  # provenance, JSON-serialisable

    def __post_init__(self) -> None:
        problem = sample_problem(self.key, self.latent, self.embedding, self.cls, self.meta)
        if problem is not None:
            raise ShardError(problem, key=self.key if isinstance(self.key, str) else None)
        object.__setattr__(self, "cls", int(self.cls))  # numpy ints become plain ints (JSON, equality)


def checked_sample(key: str, latent: np.ndarray, embedding: np.ndarray, cls: int, meta: dict) -> OutlierSample:
    """An OutlierSample from fields `sample_problem` has just passed, without checking them again.

    The reader checks each decoded sample once (and names the shard when it fails); building it
    through the constructor would run the same check a second time on every sample read.
    """
    sample = object.__new__(OutlierSample)
    for name, value in (("key", key), ("latent", latent), ("embedding", embedding), ("cls", int(cls)), ("meta", meta)):
        object.__setattr__(sample, name, value)
    return sample


def sample_problem(
    key: object, latent: object, embedding: object, cls: object, meta: object, *, meta_from_json: bool = False
) -> str | None:
    """What is wrong with these sample fields, or None; one rule for writing and reading.

    meta_from_json: the reader parsed `meta` from a shard's JSON with non-finite numbers refused,
    which makes it JSON-serialisable by construction, so the costly re-encoding test is left out.
    """
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        return (
            f"key: expected 1-200 letters, digits, '_' or '-' (no dots or slashes: WebDataset splits "
            f"member names at the first dot), got {key!r}"
        )
    if not isinstance(latent, np.ndarray):
        return f"latent: expected a numpy array, got {type(latent).__name__}"
    if latent.ndim != 3 or min(latent.shape) < 1:
        return f"latent: expected shape (C, H, W) with every size >= 1, got {tuple(latent.shape)}"
    if latent.dtype not in LATENT_DTYPES:
        return f"latent: expected float16 or float32, got {latent.dtype}"
    if not isinstance(embedding, np.ndarray):
        return f"embedding: expected a numpy array, got {type(embedding).__name__}"
    if embedding.ndim != 1 or embedding.shape[0] < 1:
        return f"embedding: expected shape (D,) with D >= 1, got {tuple(embedding.shape)}"
    if embedding.dtype != np.float32:
        return f"embedding: expected float32, got {embedding.dtype}"
    for name, array in (("latent", latent), ("embedding", embedding)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            return f"{name}: {bad} non-finite values"
    if isinstance(cls, bool) or not isinstance(cls, int | np.integer) or cls < 0:
        return f"cls: expected a non-negative int, got {cls!r}"
    if not isinstance(meta, dict):
        return f"meta: expected a dict, got {type(meta).__name__}"
    if "schema_version" in meta:
        return "meta: 'schema_version' is reserved; the shard writer sets it"
    if meta_from_json:
        return None
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"meta: not JSON-serialisable ({exc})"
    return None


@dataclass(frozen=True)
class SampleLayout:
    """Shapes every sample of a job shares; the manifest records them so readers need not guess."""

    latent_shape: tuple[int, int, int]  # (C, H, W)
    latent_dtype: str  # "float16" | "float32"
    embed_dim: int  # D

    @classmethod
    def of(cls, latent: np.ndarray, embedding: np.ndarray) -> SampleLayout:
        return cls(tuple(int(d) for d in latent.shape), str(latent.dtype), int(embedding.shape[0]))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"latent {self.latent_shape} {self.latent_dtype}, embedding ({self.embed_dim},)"

    @cached_property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.latent_dtype)

    def mismatch(self, latent: np.ndarray, embedding: np.ndarray, source: str = "the manifest") -> str | None:
        """How a sample's arrays differ from this layout (which `source` gave), or None."""
        # dtype objects, not str(dtype): the reader asks this of every sample, and str() costs 5 us.
        if latent.shape == self.latent_shape and latent.dtype == self.numpy_dtype:
            if embedding.shape == (self.embed_dim,):
                return None
        return f"{SampleLayout.of(latent, embedding).describe()}, but {source} has {self.describe()}"

    def to_json(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "latent_dtype": self.latent_dtype, "embed_dim": self.embed_dim}

    @classmethod
    def from_json(cls, data: object, where: str = "layout") -> SampleLayout:
        """Parse the manifest's `layout`; errors name `where` and the field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected an object with latent_shape, latent_dtype, embed_dim")
        shape = data.get("latent_shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
        ):
            raise ManifestError(f"{where}.latent_shape: expected [C, H, W] of positive ints, got {shape!r}")
        dtype = data.get("latent_dtype")
        if dtype not in [str(d) for d in LATENT_DTYPES]:
            raise ManifestError(f"{where}.latent_dtype: expected 'float16' or 'float32', got {dtype!r}")
        dim = data.get("embed_dim")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ManifestError(f"{where}.embed_dim: expected a positive int, got {dim!r}")
        return cls(tuple(shape), dtype, dim)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one finished shard."""

    name: str  # file name, e.g. outliers-000003.tar
    count: int  # samples
    bytes: int  # file size
    sha256: str  # hex digest of the file

    def to_json(self) -> dict:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: object, where: str = "shard") -> ShardInfo:
        """Parse a manifest entry; errors name `where` (e.g. "shards[2]") and the field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected an object with name, count, bytes, sha256")
        for name in ("name", "count", "bytes", "sha256"):
            if name not in data:
                raise ManifestError(f"{where}.{name}: missing")
        if not isinstance(data["name"], str) or not SHARD_NAME_PATTERN.match(data["name"]):
            raise ManifestError(f"{where}.name: expected a file name like {SHARD_PATTERN % 0}, got {data['name']!r}")
        for name in ("count", "bytes"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ManifestError(f"{where}.{name}: expected a non-negative int, got {value!r}")
        if not isinstance(data["sha256"], str) or not SHA256_PATTERN.match(data["sha256"]):
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {data['sha256']!r}")
        return cls(name=data["name"], count=data["count"], bytes=data["bytes"], sha256=data["sha256"])


def shard_name(index: int) -> str:
    """The file name of shard `index`: outliers-000042.tar."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise ShardError(f"index: expected a non-negative int, got {index!r}")
    return SHARD_PATTERN % index


def sample_key(job_id: str, cls: int, boundary_index: int, rep: int) -> str:
    """Key of the `rep`-th outlier kept around boundary point `boundary_index` of class `cls`."""
    if not isinstance(job_id, str) or not KEY_PATTERN.match(job_id):
        raise ShardError(f"job_id: expected letters, digits, '_' or '-' (it becomes a key prefix), got {job_id!r}")
    for name, value in (("cls", cls), ("boundary_index", boundary_index), ("rep", rep)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ShardError(f"{name}: expected a non-negative int, got {value!r}")
    key = f"{job_id}_c{cls:04d}_b{boundary_index:06d}_r{rep:03d}"
    if not KEY_PATTERN.match(key):
        raise ShardError(f"job_id: too long, key {key!r} exceeds 200 characters")
    return key
