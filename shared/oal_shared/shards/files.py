"""Shard files on disk: which are finished, and what one holds (count, size, sha256, layout)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from oal_shared.errors import ShardError
from oal_shared.shards.schema import LATENT_DTYPES, SHARD_NAME_PATTERN, SampleLayout, ShardInfo

_READ_CHUNK = 1 << 20  # bytes per read when hashing a file
_TAR_END_BYTES = 2 * tarfile.BLOCKSIZE  # every complete tar ends with two zero blocks


def list_shards(out_dir: str | Path) -> list[Path]:
    """Finished shards in `out_dir`, in index order; temp files never match. [] if the folder is absent."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path) for path in out_dir.iterdir() if (match := SHARD_NAME_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def describe_shard(path: str | Path) -> ShardInfo:
    """Read a shard file: its sample count, size and sha256. A damaged tar raises ShardError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = sha256_of(path)
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


def shard_layout(path: str | Path) -> SampleLayout:
    """The layout of a shard's first sample (the writer makes every sample of a shard share it).

    Reads the tar only up to that sample's latent and embedding members.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    first_key = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, suffix = member.name.split("/")[-1].partition(".")
                first_key = first_key or key
                if key != first_key:
                    break
                if member.isfile() and suffix in ("latent.npy", "emb.npy"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    arrays[suffix] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        raise ShardError(f"cannot read the first sample ({exc})", shard=str(path)) from exc
    if set(arrays) != {"latent.npy", "emb.npy"}:
        raise ShardError("the first sample lacks latent.npy or emb.npy", shard=str(path), key=first_key)
    latent, embedding = arrays["latent.npy"], arrays["emb.npy"]
    if latent.ndim != 3 or latent.dtype not in LATENT_DTYPES or embedding.ndim != 1:
        raise ShardError(
            f"the first sample has latent {latent.dtype} {latent.shape} and embedding {embedding.shape}; "
            "expected (C, H, W) float16/float32 and (D,)",
            shard=str(path),
            key=first_key,
        )
    return SampleLayout.of(latent, embedding)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
