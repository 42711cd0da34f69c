"""Outlier shards: WebDataset tar files of synthesised latents, and the manifest of a finished job.

Layout (SPEC section 3): shards `outliers-%06d.tar`, one sample per outlier, members

    <key>.cls         source ID class, ASCII int
    <key>.emb.npy     the conditioning embedding, (D,) float32
    <key>.json        provenance (job id, generator, seed, ...) plus "schema_version"
    <key>.latent.npy  z0 before any VAE decode, (C, H, W) float16 or float32, unscaled

and `manifest.json` with the job spec and, per shard, its name, sample count, bytes and sha256.
A shard appears under its final name only when complete: it is written to a hidden temp name,
fsynced and renamed.

Importing this module does not import webdataset, because webdataset imports torch and the API
process reads manifests without torch. Writing and reading import webdataset inside the calls.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from oal_shared.errors import ConfigError, ManifestError, ShardError
from oal_shared.fsio import atomic_file

if TYPE_CHECKING:
    import webdataset

__all__ = [
    "MANIFEST_NAME",
    "SHARD_PATTERN",
    "SHARD_SCHEMA_VERSION",
    "OutlierSample",
    "ReadStats",
    "ShardInfo",
    "decode_outlier_sample",
    "describe_shard",
    "iter_outlier_samples",
    "list_shards",
    "outlier_pipeline",
    "read_manifest",
    "sample_key",
    "shard_name",
    "verify_shards",
    "write_manifest",
    "write_shard",
]

logger = logging.getLogger(__name__)

SHARD_SCHEMA_VERSION = 1
SHARD_PATTERN = "outliers-%06d.tar"
MANIFEST_NAME = "manifest.json"
SAMPLE_MEMBERS = ("latent.npy", "emb.npy", "cls", "json")

# WebDataset groups tar members into samples by the text before the first dot of the file name,
# so a key must hold no dot; we also keep slashes and other surprises out of file names.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_SHARD_NAME_PATTERN = re.compile(r"^outliers-(\d{6,})\.tar$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_LATENT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_READ_CHUNK = 1 << 20  # bytes per read when hashing a file
_TAR_END_BYTES = 2 * tarfile.BLOCKSIZE  # every complete tar ends with two zero blocks


# --- one sample ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutlierSample:
    """One synthesised outlier as stored in a shard; checked on construction."""

    key: str  # sample id inside the shard: letters, digits, '_' and '-' only (no dots, no slashes)
    latent: np.ndarray  # (C, H, W) float16 | float32, unscaled z0
    embedding: np.ndarray  # (D,) float32, the conditioning embedding that produced the latent
    cls: int  # source ID class
    meta: dict  # provenance, JSON-serialisable

    def __post_init__(self) -> None:
        problem = _sample_problem(self.key, self.latent, self.embedding, self.cls, self.meta)
        if problem is not None:
            raise ShardError(problem, key=self.key if isinstance(self.key, str) else None)
        object.__setattr__(self, "cls", int(self.cls))  # numpy ints become plain ints (JSON, equality)


def _sample_problem(key: object, latent: object, embedding: object, cls: object, meta: object) -> str | None:
    """What is wrong with these sample fields, or None; one rule for writing and reading."""
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        return (
            f"key: expected 1-200 letters, digits, '_' or '-' (no dots or slashes: WebDataset splits "
            f"member names at the first dot), got {key!r}"
        )
    if not isinstance(latent, np.ndarray):
        return f"latent: expected a numpy array, got {type(latent).__name__}"
    if latent.ndim != 3 or min(latent.shape) < 1:
        return f"latent: expected shape (C, H, W) with every size >= 1, got {tuple(latent.shape)}"
    if latent.dtype not in _LATENT_DTYPES:
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
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"meta: not JSON-serialisable ({exc})"
    return None


def sample_key(job_id: str, cls: int, boundary_index: int, rep: int) -> str:
    """Key of the `rep`-th outlier kept around boundary point `boundary_index` of class `cls`."""
    if not isinstance(job_id, str) or not _KEY_PATTERN.match(job_id):
        raise ShardError(
            f"job_id: expected letters, digits, '_' or '-' (it becomes a key prefix), got {job_id!r}"
        )
    for name, value in (("cls", cls), ("boundary_index", boundary_index), ("rep", rep)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ShardError(f"{name}: expected a non-negative int, got {value!r}")
    key = f"{job_id}_c{cls:04d}_b{boundary_index:06d}_r{rep:03d}"
    if not _KEY_PATTERN.match(key):
        raise ShardError(f"job_id: too long, key {key!r} exceeds 200 characters")
    return key


# --- writing shards ------------------------------------------------------------------------------


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
        if not isinstance(data["name"], str) or not _SHARD_NAME_PATTERN.match(data["name"]):
            raise ManifestError(
                f"{where}.name: expected a file name like {SHARD_PATTERN % 0}, got {data['name']!r}"
            )
        for name in ("count", "bytes"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ManifestError(f"{where}.{name}: expected a non-negative int, got {value!r}")
        if not isinstance(data["sha256"], str) or not _SHA256_PATTERN.match(data["sha256"]):
            raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {data['sha256']!r}")
        return cls(name=data["name"], count=data["count"], bytes=data["bytes"], sha256=data["sha256"])


def shard_name(index: int) -> str:
    """The file name of shard `index`: outliers-000042.tar."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise ShardError(f"index: expected a non-negative int, got {index!r}")
    return SHARD_PATTERN % index


def write_shard(out_dir: str | Path, index: int, samples: Sequence[OutlierSample]) -> ShardInfo:
    """Write `samples` as shard `index` in `out_dir`; returns what the manifest needs about it.

    Every sample is checked before anything touches the disk, so a bad one leaves no file. The
    tar goes to a hidden temp name, is fsynced and renamed over the final name (a rewrite after a
    resumed job replaces the old shard whole). Same samples in the same order give the same bytes.
    """
    name = shard_name(index)
    samples = list(samples)
    _check_shard_samples(samples, name)
    encoded = [_encode_sample(sample, name) for sample in samples]

    from webdataset import TarWriter  # imports torch: only processes that write shards pay for it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    with atomic_file(final) as handle:
        sink = _HashingSink(handle)
        # mtime=0 and fixed owner/mode make the bytes a function of the samples alone.
        with TarWriter(sink, encoder=False, mtime=0) as writer:
            for sample in encoded:
                writer.write(sample)
    info = ShardInfo(name=name, count=len(samples), bytes=sink.size, sha256=sink.hexdigest())
    logger.info("Wrote shard %s: %d samples, %d bytes", final, info.count, info.bytes)
    return info


def _check_shard_samples(samples: list[OutlierSample], shard: str) -> None:
    if not samples:
        raise ShardError("samples: a shard needs at least one sample", shard=shard)
    first_seen: dict[str, int] = {}
    for position, sample in enumerate(samples):
        if not isinstance(sample, OutlierSample):
            raise ShardError(
                f"samples[{position}]: expected an OutlierSample, got {type(sample).__name__}", shard=shard
            )
        # Checked again: arrays and meta are mutable after construction.
        problem = _sample_problem(sample.key, sample.latent, sample.embedding, sample.cls, sample.meta)
        if problem is not None:
            raise ShardError(problem, shard=shard, key=sample.key)
        if sample.key in first_seen:
            raise ShardError(
                f"duplicate key: samples[{first_seen[sample.key]}] and samples[{position}] share it",
                shard=shard,
                key=sample.key,
            )
        first_seen[sample.key] = position


def _encode_sample(sample: OutlierSample, shard: str) -> dict[str, Any]:
    """Member bytes of one sample; JSON with sorted keys so equal samples give equal bytes."""
    provenance = {**sample.meta, "schema_version": SHARD_SCHEMA_VERSION}
    try:
        meta_text = json.dumps(provenance, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShardError(f"meta: not JSON-serialisable ({exc})", shard=shard, key=sample.key) from exc
    return {
        "__key__": sample.key,
        "latent.npy": _npy_bytes(sample.latent),
        "emb.npy": _npy_bytes(sample.embedding),
        "cls": str(int(sample.cls)).encode("ascii"),
        "json": meta_text.encode("utf-8"),
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class _HashingSink:
    """A write-only file that hashes and counts what passes through (saves re-reading the shard)."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._handle.write(data)
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


# --- files on disk -------------------------------------------------------------------------------


def list_shards(out_dir: str | Path) -> list[Path]:
    """Finished shards in `out_dir`, in index order; temp files never match. [] if the folder is absent."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in out_dir.iterdir()
        if (match := _SHARD_NAME_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def describe_shard(path: str | Path) -> ShardInfo:
    """Read a shard file: its sample count, size and sha256. A damaged tar raises ShardError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = _sha256_of(path)
        keys: set[str] = set()
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    raise ShardError(
                        f"truncated: member {member.name} ends past the file's {size} bytes", shard=str(path)
                    )
                if member.isfile():
                    keys.add(member.name.split("/")[-1].split(".", 1)[0])
            end_of_members = tar.offset
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ShardError(f"cannot read tar ({exc})", shard=str(path)) from exc
    if end_of_members + _TAR_END_BYTES > size:
        raise ShardError("truncated: the tar's end-of-archive blocks are missing", shard=str(path))
    return ShardInfo(name=path.name, count=len(keys), bytes=size, sha256=digest)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- the manifest --------------------------------------------------------------------------------

_MANIFEST_KEYS = ("schema_version", "spec", "shards", "num_samples")


def write_manifest(
    out_dir: str | Path, spec: dict, shards: Sequence[ShardInfo], extra: dict | None = None
) -> Path:
    """Write `manifest.json` atomically: schema_version, spec, shards (by name), num_samples, + extra.

    `extra` keys go at the top level (e.g. job_id, generator); they may not shadow the fixed keys.
    """
    out_dir = Path(out_dir)
    if not isinstance(spec, dict):
        raise ManifestError(f"spec: expected a JSON object (dict), got {type(spec).__name__}")
    if not all(isinstance(info, ShardInfo) for info in shards):
        raise ManifestError("shards: expected a sequence of ShardInfo")
    infos = sorted(shards, key=lambda info: info.name)  # independent of the order shards finished in
    names = [info.name for info in infos]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(f"shards: listed more than once: {repeated}")
    document: dict[str, Any] = {
        "schema_version": SHARD_SCHEMA_VERSION,
        "spec": spec,
        "shards": [info.to_json() for info in infos],
        "num_samples": sum(info.count for info in infos),
    }
    for key, value in (extra or {}).items():
        if key in _MANIFEST_KEYS:
            raise ManifestError(f"extra: key {key!r} is reserved for the manifest itself")
        document[key] = value
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"spec/extra: not JSON-serialisable ({exc})") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))
    return path


def read_manifest(out_dir: str | Path) -> dict:
    """Load and check `out_dir/manifest.json` (a path to the file itself works too)."""
    path = Path(out_dir)
    if path.name != MANIFEST_NAME or path.is_dir():
        path = path / MANIFEST_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{path}: no manifest (the job has not finished, or this is no shard folder)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ManifestError(f"{path}: expected a JSON object at the top level")
    for key in _MANIFEST_KEYS:
        if key not in document:
            raise ManifestError(f"{path}: key {key!r} is missing")
    version = document["schema_version"]
    if version != SHARD_SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version is {version!r}, this version reads {SHARD_SCHEMA_VERSION}"
        )
    if not isinstance(document["spec"], dict):
        raise ManifestError(f"{path}: spec must be an object")
    if not isinstance(document["shards"], list):
        raise ManifestError(f"{path}: shards must be a list")
    infos = [
        ShardInfo.from_json(entry, where=f"{path}: shards[{i}]") for i, entry in enumerate(document["shards"])
    ]
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: shards lists a name more than once")
    held = sum(info.count for info in infos)
    if document["num_samples"] != held:
        raise ManifestError(f"{path}: num_samples is {document['num_samples']!r} but the shards hold {held}")
    return document


def verify_shards(out_dir: str | Path) -> list[ShardInfo]:
    """Check every shard the manifest lists: present, same size, same sha256. Returns the entries."""
    out_dir = Path(out_dir)
    infos = [ShardInfo.from_json(entry) for entry in read_manifest(out_dir)["shards"]]
    for info in infos:
        path = out_dir / info.name
        if not path.is_file():
            raise ManifestError("listed in the manifest but missing on disk", shard=info.name)
        size = path.stat().st_size
        if size != info.bytes:
            raise ManifestError(f"{size} bytes on disk, the manifest says {info.bytes}", shard=info.name)
        digest = _sha256_of(path)
        if digest != info.sha256:
            raise ManifestError(f"sha256 {digest} on disk, the manifest says {info.sha256}", shard=info.name)
    listed = {info.name for info in infos}
    unlisted = [path.name for path in list_shards(out_dir) if path.name not in listed]
    if unlisted:
        logger.warning("Shards in %s that the manifest does not list (ignored): %s", out_dir, unlisted)
    return infos


# --- reading samples -----------------------------------------------------------------------------


def decode_outlier_sample(raw: dict, shard: str) -> OutlierSample:
    """Turn WebDataset's dict of member bytes into an OutlierSample; ShardError names shard and key."""
    key = raw.get("__key__")
    if not isinstance(key, str):
        raise ShardError("sample without a __key__", shard=shard)
    missing = [member for member in SAMPLE_MEMBERS if member not in raw]
    if missing:
        raise ShardError(
            f"missing member {', '.join(missing)} (a sample has {', '.join(SAMPLE_MEMBERS)})", shard, key
        )
    for member in SAMPLE_MEMBERS:
        if not isinstance(raw[member], bytes | bytearray | memoryview):
            raise ShardError(f"{member}: expected raw bytes, got {type(raw[member]).__name__}", shard, key)
    latent = _read_npy(raw["latent.npy"], "latent.npy", shard, key)
    embedding = _read_npy(raw["emb.npy"], "emb.npy", shard, key)
    try:
        cls = int(bytes(raw["cls"]).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardError(
            f"cls: expected an ASCII integer, got {bytes(raw['cls'])[:20]!r}", shard, key
        ) from exc
    meta = _read_provenance(raw["json"], shard, key)
    problem = _sample_problem(key, latent, embedding, cls, meta)
    if problem is not None:
        raise ShardError(problem, shard=shard, key=key)
    return OutlierSample(key=key, latent=latent, embedding=embedding, cls=cls, meta=meta)


def _read_npy(data: bytes, member: str, shard: str, key: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ShardError(f"{member}: not a readable .npy array ({exc})", shard, key) from exc


def _read_provenance(data: bytes, shard: str, key: str) -> dict:
    try:
        meta = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"json: not valid JSON ({exc})", shard, key) from exc
    if not isinstance(meta, dict):
        raise ShardError(f"json: expected an object, got {type(meta).__name__}", shard, key)
    version = meta.pop("schema_version", None)
    if version != SHARD_SCHEMA_VERSION:
        raise ShardError(
            f"json: schema_version is {version!r}, this version reads {SHARD_SCHEMA_VERSION}", shard, key
        )
    return meta


@dataclass
class ReadStats:
    """What a reader saw. Counts live in the process that iterates (each DataLoader worker has its own)."""

    samples: int = 0  # decoded and yielded
    skipped: int = 0  # problems skipped under on_error="skip": one per broken shard or bad sample
    errors: list[str] = field(default_factory=list)  # their messages


class _ErrorPolicy:
    """The on_error policy as WebDataset handlers and stages; errors become ShardError naming the shard.

    WebDataset handlers return True to go on and False to stop. A handler never raises here: it
    stores the error and the stage after the tar reader raises it, because WebDataset rewrites the
    args of exceptions on their way through its stages (which would garble our messages).
    Under "skip" a shard that fails is left out for the rest of this pipeline's life (in this
    process); samples it delivered before the failure have already gone downstream.
    """

    def __init__(self, on_error: str, stats: ReadStats, urls: list[str]):
        self.on_error = on_error
        self.stats = stats
        self.urls = frozenset(urls)
        self.broken: set[str] = set()
        self.pending: ShardError | None = None
        # WebDataset opens the next shard only when the last one is used up, so the shard most
        # recently handed to the tar reader is the one any tar error comes from.
        self.current_url = "(no shard opened yet)"

    def skip_broken_shards(self, shards: Iterator[dict]) -> Iterator[dict]:
        """Stage before the tar reader: leave out shards that failed before."""
        for shard in shards:
            if shard["url"] in self.broken:
                if self.broken >= self.urls:
                    raise ShardError(f"all {len(self.urls)} shards are unreadable: {self.stats.errors[-1]}")
                continue
            self.current_url = shard["url"]
            yield shard

    def on_tar_error(self, exc: BaseException) -> bool:
        url = self.current_url
        error = ShardError(f"unreadable tar ({_describe(exc)})", shard=url)
        if self.on_error == "raise":
            self.pending = self.pending or error
            return False
        if url not in self.broken:  # later errors from a broken stream repeat the first
            self.broken.add(url)
            self._count_skip(error)
        return True

    def raise_pending(self, samples: Iterator[dict]) -> Iterator[dict]:
        """Stage after the tar reader: raise a stored error; drop what a broken shard still yields."""
        self.pending = None
        for sample in samples:
            if self.pending is not None:
                raise self.pending
            if sample.get("__url__") in self.broken:
                continue  # the half-read sample at the break
            yield sample
        if self.pending is not None:
            raise self.pending

    def on_sample_error(self, exc: BaseException) -> bool:
        if self.on_error == "raise" or not isinstance(exc, ShardError):
            raise exc
        self._count_skip(exc)
        return True

    def _count_skip(self, error: ShardError) -> None:
        self.stats.skipped += 1
        self.stats.errors.append(str(error))
        logger.warning("Skipping: %s", error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    first = str(exc.args[0]) if exc.args else ""
    return f"{type(exc).__name__}: {first.split(' @ ')[0]}"  # drop WebDataset's " @ <file object>"


class _SampleDecoder:
    """Map stage: raw WebDataset sample -> OutlierSample, counting successes."""

    def __init__(self, stats: ReadStats):
        self.stats = stats

    def __call__(self, raw: dict) -> OutlierSample:
        sample = decode_outlier_sample(raw, shard=str(raw.get("__url__", "(unknown shard)")))
        self.stats.samples += 1
        return sample


class _SeededShuffle:
    """Buffer shuffle whose order is a function of (seed, epoch, rank, worker) only.

    The epoch counter lives in this object and advances each time the pipeline is iterated, so
    every pass differs while a fresh pipeline with the same seed repeats the first pass.
    """

    def __init__(self, bufsize: int, seed: int):
        self.bufsize = bufsize
        self.seed = seed
        self.epoch = -1

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        from webdataset import shuffle, utils

        self.epoch += 1
        rank, _, worker, _ = utils.pytorch_worker_info()
        rng = random.Random(f"oal-shuffle:{self.seed}:{self.epoch}:{rank}:{worker}")
        return shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)


def _shard_urls(urls: Sequence[str | Path] | str | Path) -> list[str]:
    url_list = [str(urls)] if isinstance(urls, str | Path) else [str(url) for url in urls]
    if not url_list:
        raise ConfigError("urls: no shards to read (empty list)")
    return url_list


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")


def _reading_stages(policy: _ErrorPolicy, stats: ReadStats, shuffle: int, seed: int) -> list:
    """shard urls -> raw samples -> (shuffled) -> OutlierSample, with the error policy at each step."""
    import webdataset as wds

    stages: list = [
        policy.skip_broken_shards,
        wds.tarfile_to_samples(handler=policy.on_tar_error),
        policy.raise_pending,
    ]
    if shuffle:
        stages.append(_SeededShuffle(shuffle, seed))
    stages.append(wds.map(_SampleDecoder(stats), handler=policy.on_sample_error))
    return stages


def iter_outlier_samples(
    urls: Sequence[str | Path],
    on_error: Literal["raise", "skip"] = "raise",
    stats: ReadStats | None = None,
) -> Iterator[OutlierSample]:
    """Every sample of `urls`, shard after shard, in file order (for tools and tests).

    on_error="raise": the first damaged shard or bad sample raises ShardError naming the shard
    (and key). "skip": it is logged, counted in `stats`, and reading goes on; a shard that breaks
    mid-read keeps the samples read before the break.
    """
    import webdataset as wds

    _check_on_error(on_error)
    url_list = _shard_urls(urls)
    stats = stats if stats is not None else ReadStats()
    policy = _ErrorPolicy(on_error, stats, url_list)
    yield from wds.DataPipeline(
        wds.SimpleShardList(url_list), *_reading_stages(policy, stats, shuffle=0, seed=0)
    )


def outlier_pipeline(
    urls: Sequence[str | Path],
    *,
    resampled: bool = False,
    epoch_length: int | None = None,
    shuffle: int = 0,
    seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
    stats: ReadStats | None = None,
    split_by_node: bool = True,
) -> webdataset.DataPipeline:
    """A WebDataset pipeline of OutlierSample, ready for torch DataLoader workers and torchrun.

    Stages: shard list -> [split by node] -> split by worker -> tar reader -> [shuffle] -> decode.

    resampled=False: `SimpleShardList`; ranks (if `split_by_node`) and DataLoader workers each take
    a disjoint slice of the shards, so a rank with no shard yields nothing. With `shuffle` the shard
    order is shuffled too, with `seed`, the same way on every rank (the slices stay disjoint).
    resampled=True: `ResampledShards` draws shards with replacement forever; no splitting, since
    each rank and worker draws its own stream (seeded by seed, rank*1000 + worker and the epoch).
    epoch_length: one pass yields exactly this many samples (it repeats a finite shard list and
    cuts the resampled stream, which without it never ends).
    shuffle: buffer size in samples for sample-level shuffling; 0 keeps file order.

    Seeds and repetition: shard draws and the shuffle depend only on (seed, epoch, rank, worker).
    A freshly built pipeline with the same seed and the same workers gives the same order; each
    further pass over the same object advances its epoch and gives a new order. DataLoader workers
    that are not persistent get a fresh copy every epoch, so every epoch repeats the first: pass
    persistent_workers=True, or rebuild with seed=base_seed + epoch.
    """
    import webdataset as wds

    _check_on_error(on_error)
    url_list = _shard_urls(urls)
    if epoch_length is not None and (isinstance(epoch_length, bool) or epoch_length < 1):
        raise ConfigError(
            f"epoch_length: expected a positive number of samples or None, got {epoch_length!r}"
        )
    if isinstance(shuffle, bool) or shuffle < 0:
        raise ConfigError(f"shuffle: expected a buffer size >= 0 (0 = no shuffle), got {shuffle!r}")
    stats = stats if stats is not None else ReadStats()
    policy = _ErrorPolicy(on_error, stats, url_list)

    if resampled:
        source: list = [wds.ResampledShards(url_list, seed=seed, deterministic=True)]
    else:
        source = [wds.SimpleShardList(url_list, seed=seed if shuffle else None)]
        if split_by_node:
            source.append(wds.split_by_node)
        source.append(wds.split_by_worker)
    pipeline = wds.DataPipeline(*source, *_reading_stages(policy, stats, shuffle, seed))
    if epoch_length is not None:
        pipeline = pipeline.with_epoch(epoch_length)
    return pipeline
