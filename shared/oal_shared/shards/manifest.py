"""manifest.json: a finished job's commit record, and the input every outlier reader opens first.

It holds the job spec, every shard (name, count, bytes, sha256), the samples' layout (latent shape
and dtype, embedding size) and the generator (id and content hash). The worker writes it last, so
a folder without one is a job still running or one that crashed (docs/METHOD.md, Contracts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oal_shared.errors import ManifestError
from oal_shared.fsio import atomic_write_bytes
from oal_shared.shards.files import list_shards, sha256_of, shard_layout
from oal_shared.shards.schema import MANIFEST_NAME, SHA256_PATTERN, SampleLayout, ShardInfo

logger = logging.getLogger(__name__)

# 2: adds `layout` and `generator` (id, content_hash), so readers take shapes from the manifest.
MANIFEST_SCHEMA_VERSION = 2
_MANIFEST_KEYS = ("schema_version", "spec", "shards", "num_samples", "layout", "generator")


@dataclass(frozen=True)
class GeneratorRef:
    """The generator that made a job's latents: what a decoder checks its VAE folder against."""

    id: str
    content_hash: str  # sha256 over the generator folder's files (oal_shared.generator_hash)

    @classmethod
    def from_json(cls, data: object, where: str = "generator") -> GeneratorRef:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: expected an object with id and content_hash")
        if not isinstance(data.get("id"), str) or not data["id"]:
            raise ManifestError(f"{where}.id: expected a non-empty string, got {data.get('id')!r}")
        digest = data.get("content_hash")
        if not isinstance(digest, str) or not SHA256_PATTERN.match(digest):
            raise ManifestError(f"{where}.content_hash: expected 64 lowercase hex digits, got {digest!r}")
        return cls(id=data["id"], content_hash=digest)


@dataclass(frozen=True, eq=False)
class OutlierManifest:
    """A parsed, checked manifest of the job folder `folder`; `document` is the JSON as read."""

    folder: Path
    document: dict
    shards: tuple[ShardInfo, ...]
    layout: SampleLayout
    generator: GeneratorRef

    @property
    def num_samples(self) -> int:
        return int(self.document["num_samples"])

    @property
    def spec(self) -> dict:
        return self.document["spec"]

    @property
    def job_id(self) -> str | None:
        return self.document.get("job_id")

    @property
    def shard_paths(self) -> list[Path]:
        return [self.folder / info.name for info in self.shards]


def write_manifest(
    out_dir: str | Path,
    spec: dict,
    shards: Sequence[ShardInfo],
    extra: dict | None = None,
    *,
    generator: Mapping[str, Any],
) -> Path:
    """Write `manifest.json` atomically: schema_version, spec, shards (by name), num_samples,
    layout, generator, + extra.

    `generator` needs `id` and `content_hash` (more keys are kept as given). The layout is read
    from the first sample of every listed shard in `out_dir`, which must all agree. `extra` keys go
    at the top level (e.g. job_id); they may not shadow the fixed keys.
    """
    out_dir = Path(out_dir)
    if not isinstance(spec, dict):
        raise ManifestError(f"spec: expected a JSON object (dict), got {type(spec).__name__}")
    if not all(isinstance(info, ShardInfo) for info in shards):
        raise ManifestError("shards: expected a sequence of ShardInfo")
    if not shards:
        raise ManifestError("shards: a finished job lists at least one shard")
    GeneratorRef.from_json(generator)
    infos = sorted(shards, key=lambda info: info.name)  # independent of the order shards finished in
    names = [info.name for info in infos]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(f"shards: listed more than once: {repeated}")
    document: dict[str, Any] = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "spec": spec,
        "shards": [info.to_json() for info in infos],
        "num_samples": sum(info.count for info in infos),
        "layout": _common_layout(out_dir, infos).to_json(),
        "generator": dict(generator),
    }
    for key, value in (extra or {}).items():
        if key in _MANIFEST_KEYS:
            raise ManifestError(f"extra: key {key!r} is reserved for the manifest itself")
        document[key] = value
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"spec/extra/generator: not JSON-serialisable ({exc})") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _common_layout(out_dir: Path, infos: Sequence[ShardInfo]) -> SampleLayout:
    first = shard_layout(out_dir / infos[0].name)
    for info in infos[1:]:
        layout = shard_layout(out_dir / info.name)
        if layout != first:
            raise ManifestError(
                f"shards: {info.name} holds {layout.describe()}, {infos[0].name} holds {first.describe()}"
            )
    return first


def read_manifest(out_dir: str | Path) -> dict:
    """Load and check `out_dir/manifest.json` (a path to the file itself works too); the JSON as read.

    A folder without one raises ManifestError saying what that means (job running or crashed).
    """
    return _read(out_dir).document


def load_manifest(out_dir: str | Path) -> OutlierManifest:
    """The manifest of a finished job folder, parsed: what outlier readers open first.

    Damaged or missing shards are left to the reader's error policy (raise, or skip and count);
    `verify_shards` checks them all up front. Shards on disk the manifest does not list are
    ignored, with a warning.
    """
    manifest = _read(out_dir)
    listed = {info.name for info in manifest.shards}
    unlisted = [path.name for path in list_shards(manifest.folder) if path.name not in listed]
    if unlisted:
        logger.warning("Shards in %s that the manifest does not list (ignored): %s", manifest.folder, unlisted)
    return manifest


def verify_shards(out_dir: str | Path) -> list[ShardInfo]:
    """Check every shard the manifest lists: present, same size, same sha256. Returns the entries."""
    manifest = load_manifest(out_dir)
    for path, info in zip(manifest.shard_paths, manifest.shards, strict=True):
        if not path.is_file():
            raise ManifestError("listed in the manifest but missing on disk", shard=str(path))
        size = path.stat().st_size
        if size != info.bytes:
            raise ManifestError(f"{size} bytes on disk, the manifest says {info.bytes}", shard=str(path))
        digest = sha256_of(path)
        if digest != info.sha256:
            raise ManifestError(f"sha256 {digest} on disk, the manifest says {info.sha256}", shard=str(path))
    return list(manifest.shards)


def _read(out_dir: str | Path) -> OutlierManifest:
    path = Path(out_dir)
    if path.name != MANIFEST_NAME or path.is_dir():
        path = path / MANIFEST_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(_no_manifest(path.parent)) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    return _parse(path, document)


def _no_manifest(folder: Path) -> str:
    if not folder.is_dir():
        return f"{folder}: no such folder (a synthesis job's output folder holds shards and {MANIFEST_NAME})"
    shards = list_shards(folder)
    if shards:
        return (
            f"{folder}: {len(shards)} shards but no {MANIFEST_NAME}: the job writing them is still running, "
            "or it crashed before it finished (the manifest is written last); wait for the job to finish, "
            "or retry it"
        )
    return f"{folder}: no {MANIFEST_NAME} and no shards (not a synthesis job's output, or the job has not started)"


def _parse(path: Path, document: object) -> OutlierManifest:
    """Check the whole document; errors name the manifest file and the field."""
    if not isinstance(document, dict):
        raise ManifestError(f"{path}: expected a JSON object at the top level")
    version = document.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version is {version!r}, this version reads {MANIFEST_SCHEMA_VERSION}"
            + (" (written before manifests recorded layout and generator: run the job again)" if version == 1 else "")
        )
    for key in _MANIFEST_KEYS:
        if key not in document:
            raise ManifestError(f"{path}: key {key!r} is missing")
    if not isinstance(document["spec"], dict):
        raise ManifestError(f"{path}: spec must be an object")
    if not isinstance(document["shards"], list) or not document["shards"]:
        raise ManifestError(f"{path}: shards must be a non-empty list")
    infos = tuple(
        ShardInfo.from_json(entry, where=f"{path}: shards[{i}]") for i, entry in enumerate(document["shards"])
    )
    names = [info.name for info in infos]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: shards lists a name more than once")
    held = sum(info.count for info in infos)
    if document["num_samples"] != held:
        raise ManifestError(f"{path}: num_samples is {document['num_samples']!r} but the shards hold {held}")
    return OutlierManifest(
        folder=path.parent,
        document=document,
        shards=infos,
        layout=SampleLayout.from_json(document["layout"], where=f"{path}: layout"),
        generator=GeneratorRef.from_json(document["generator"], where=f"{path}: generator"),
    )
