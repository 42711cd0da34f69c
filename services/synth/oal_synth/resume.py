"""Resuming a job: which shards on disk a retried attempt keeps, and what a killed writer left behind.

A retried job finds shards under their final names, complete by construction (write, fsync,
rename; docs/METHOD.md, Contracts). Complete is not enough to keep one: it may come from another
job, from older weights of the generator, from another spec under the same job id, or from a
sampler that picked other boundary points (another k-NN backend or version). A shard is kept only
when every sample in it is the one this attempt would write: same key, class and conditioning
embedding, and the same provenance (job id, generator id and content hash, spec hash, the
outlier's seed, sampler and diffusion settings). Anything else is written again, and the log says
why.

Two attempts of one job may run at once (a worker presumed dead comes back). Shard writes take an
exclusive lock on the job folder and look again under it, so a shard that one attempt completed is
never replaced by the other when both plan the same samples. The manifest is written under the
same lock from the shards as they are on disk then (`confirm_shards`), so it lists every shard once
with the sha256 of the file there, even when the other attempt planned differently (a sampler that
is not bit-for-bit reproducible across machines) and replaced some.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oal_shared.errors import ShardError
from oal_shared.shards import OutlierSample, ShardInfo, describe_shard, iter_outlier_samples, shard_name, write_shard

__all__ = [
    "LOCK_NAME",
    "STALE_TEMP_AGE_S",
    "PlannedSample",
    "confirm_shards",
    "job_folder_lock",
    "naming_path_on_error",
    "remove_stale_temp_files",
    "reusable_shard",
    "shard_mismatch",
    "spec_sha256",
    "write_planned_shard",
]

logger = logging.getLogger(__name__)

#: A temp file untouched this long (seconds) has no live writer: the shard writer streams the whole
#: tar into it and renames it right after the fsync, and a dead attempt is only retried after its
#: worker missed several heartbeats. Younger ones may belong to a concurrent attempt and are kept.
STALE_TEMP_AGE_S = 60
#: The lock file of a job folder (hidden, so shard listings and generator hashes skip it).
LOCK_NAME = ".oal-shards.lock"
# The hidden names fsio's atomic writers use in a job folder: ".<target>.<pid>.<token>.tmp".
_TEMP_NAME = re.compile(r"^\.(outliers-\d{6,}\.tar|manifest\.json)\..+\.tmp$")


@dataclass(frozen=True)
class PlannedSample:
    """What one planned outlier's sample must hold, but for the latent (only denoising makes that)."""

    key: str
    cls: int
    embedding: np.ndarray  # (D,) float32, the conditioning embedding
    meta: dict  # provenance, exactly as the sample's json member will hold it


def spec_sha256(spec_json: dict) -> str:
    """sha256 of the spec as canonical JSON: equal for equal specs, whatever the key order."""
    text = json.dumps(spec_json, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- keeping a shard


def reusable_shard(out_dir: Path, index: int, planned: Sequence[PlannedSample]) -> ShardInfo | None:
    """The info of shard `index` when it is on disk and holds exactly `planned`; else None (logged why)."""
    info, reason = _check_shard(Path(out_dir) / shard_name(index), planned)
    if info is not None:
        logger.info("shard %s already complete (%d samples) and written for this job; kept", info.name, info.count)
    elif reason is not None:
        logger.warning("shard %s %s; writing it again", Path(out_dir) / shard_name(index), reason)
    return info


def shard_mismatch(path: Path, planned: Sequence[PlannedSample]) -> str | None:
    """Why the samples of the shard at `path` are not `planned`, or None when every one matches."""
    try:
        for position, (sample, want) in enumerate(zip(iter_outlier_samples([path]), planned, strict=False)):
            problem = _sample_mismatch(sample, want)
            if problem is not None:
                return f"sample {position} ({sample.key}): {problem}"
    except ShardError as exc:
        return f"is unreadable ({exc})"
    return None


def _check_shard(path: Path, planned: Sequence[PlannedSample]) -> tuple[ShardInfo | None, str | None]:
    """(info, None) for a shard to keep, (None, reason) for one to rewrite, (None, None) when absent."""
    if not path.is_file():
        return None, None
    try:
        info = describe_shard(path)
    except ShardError as exc:
        return None, f"is unreadable ({exc})"
    if info.count != len(planned):
        return None, f"holds {info.count} samples, the plan {len(planned)}"
    mismatch = shard_mismatch(path, planned)
    if mismatch is not None:
        return None, f"was not written as this job plans it: {mismatch}"
    return info, None


def _sample_mismatch(sample: OutlierSample, want: PlannedSample) -> str | None:
    differing = sorted(
        name for name in sample.meta.keys() | want.meta.keys() if sample.meta.get(name) != want.meta.get(name)
    )
    if differing:
        first = differing[0]
        return (
            f"provenance differs in {', '.join(differing)} "
            f"({first}: {sample.meta.get(first)!r} on disk, {want.meta.get(first)!r} planned)"
        )
    if sample.key != want.key:
        return f"key {sample.key!r}, the plan {want.key!r}"
    if sample.cls != want.cls:
        return f"class {sample.cls}, the plan {want.cls}"
    if sample.embedding.shape != want.embedding.shape or not np.array_equal(sample.embedding, want.embedding):
        return "conditioning embedding differs from the planned one"
    return None


# ---------------------------------------------------------------------------- writing a shard


@contextmanager
def job_folder_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive lock on a job folder across processes; the kernel releases it if the holder dies."""
    with open(Path(out_dir) / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_planned_shard(
    out_dir: Path, index: int, samples: Sequence[OutlierSample], planned: Sequence[PlannedSample]
) -> ShardInfo:
    """Write `samples` as shard `index`, unless another attempt of this job completed it meanwhile.

    A failed write (disk full, ...) leaves the previous file untouched and raises an OSError that
    names the shard's path.
    """
    out_dir = Path(out_dir)
    path = out_dir / shard_name(index)
    with job_folder_lock(out_dir):
        info, _ = _check_shard(path, planned)
        if info is not None:
            logger.info("shard %s was completed by another attempt of this job meanwhile; kept", path)
            return info
        with naming_path_on_error(path, "shard"):
            return write_shard(out_dir, index, samples)


@contextmanager
def naming_path_on_error(path: Path, what: str) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write on a full disk: ENOSPC) as one naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename:  # already names its file
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc} while writing {what}", str(path)) from exc


def confirm_shards(
    out_dir: Path, infos: Sequence[ShardInfo], planned_of: Callable[[int], Sequence[PlannedSample]]
) -> list[ShardInfo]:
    """The shards of `infos` as they are on disk now; call it holding `job_folder_lock`, right before the manifest.

    A shard that another attempt of this job replaced since this one wrote or kept it is taken as
    found when it holds this attempt's plan (`planned_of(index)`); otherwise ShardError, and this
    attempt fails (it is retried, and resumes from whatever is on disk then).
    """
    confirmed = []
    for index, info in enumerate(infos):
        path = Path(out_dir) / info.name
        on_disk = describe_shard(path)
        if on_disk.sha256 != info.sha256:
            found, reason = _check_shard(path, planned_of(index))
            if found is None:
                raise ShardError(
                    f"replaced by another attempt of this job that planned other samples: {reason}", shard=str(path)
                )
            logger.info("shard %s was rewritten by another attempt of this job, as planned; listed as found", path)
        confirmed.append(on_disk)
    return confirmed


# ---------------------------------------------------------------------------- a killed writer's leftovers


def remove_stale_temp_files(out_dir: Path, older_than_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the shard and manifest temp files in `out_dir` untouched for `older_than_s`; returns them."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    now = time.time()
    for path in sorted(out_dir.iterdir()):
        if not _TEMP_NAME.match(path.name):
            continue
        try:
            age = now - path.stat().st_mtime
            if age < older_than_s:
                logger.info("temp file %s changed %.0f s ago; a live writer may own it, kept", path, age)
                continue
            path.unlink()
        except FileNotFoundError:
            continue  # its writer renamed or removed it meanwhile
        logger.warning("removed %s, left by a writer that stopped %.0f s ago", path, age)
        removed.append(path)
    return removed
