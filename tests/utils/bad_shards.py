"""Tar shards made by hand, one fault at a time: what the readers must refuse, and how."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from oal_shared.shards import ShardInfo


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def members_of(sample) -> dict[str, bytes]:
    return {
        "latent.npy": npy(sample.latent),
        "emb.npy": npy(sample.embedding),
        "cls": str(sample.cls).encode(),
        "json": json.dumps({**sample.meta, "schema_version": 1}).encode(),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], tar_format=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=tar_format) as tar:
        for key, members in samples:
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def spoil(name: str, members: dict[str, bytes], sample) -> dict[str, bytes]:
    """One kind of bad sample, made from good members."""
    spoiled = dict(members)
    if name == "missing member":
        del spoiled["emb.npy"]
    elif name == "float64 latent":
        spoiled["latent.npy"] = npy(sample.latent.astype(np.float64))
    elif name == "pickled npy":
        spoiled["latent.npy"] = npy(np.array([{"evil": 1}], dtype=object))
    elif name == "short npy payload":  # same header as the good sample before it: the cached-header path
        spoiled["latent.npy"] = members["latent.npy"][:-10]
    elif name == "not an npy":
        spoiled["emb.npy"] = b"hello"
    elif name == "non-finite latent":
        latent = sample.latent.copy()
        latent[0, 0, 0] = np.inf
        spoiled["latent.npy"] = npy(latent)
    elif name == "2-d embedding":
        spoiled["emb.npy"] = npy(sample.embedding.reshape(8, 8))
    elif name == "other layout":
        spoiled["latent.npy"] = npy(np.zeros((4, 4, 4), np.float16))
    elif name == "bad cls":
        spoiled["cls"] = b"three"
    elif name == "negative cls":
        spoiled["cls"] = b"-1"
    elif name == "bad json":
        spoiled["json"] = b"{not json"
    elif name == "json list":
        spoiled["json"] = b"[1, 2]"
    elif name == "schema version":
        spoiled["json"] = json.dumps({**sample.meta, "schema_version": 9}).encode()
    elif name == "NaN in meta":
        spoiled["json"] = json.dumps({**sample.meta, "x": float("nan"), "schema_version": 1}).encode()
    elif name == "overflowing float in meta":
        spoiled["json"] = json.dumps({**sample.meta, "schema_version": 1})[:-1].encode() + b', "x": 1e999}'
    return spoiled


BAD_SAMPLES = [
    "missing member",
    "float64 latent",
    "pickled npy",
    "short npy payload",
    "not an npy",
    "non-finite latent",
    "2-d embedding",
    "other layout",
    "bad cls",
    "negative cls",
    "bad json",
    "json list",
    "schema version",
    "NaN in meta",
    "overflowing float in meta",
]


def info_of(path: Path) -> ShardInfo:
    """The manifest entry a shard would have if the job had written these very bytes."""
    data = path.read_bytes()
    return ShardInfo(name=path.name, count=0, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
