"""Which outlier source a run uses: `outlier_source=auto` holds a job in memory when it is small.

The choice is a function of the job's manifest (sample count and layout, so no shard is read to
make it) and the limit `OAL_OUTLIER_IN_MEMORY_MAX_MB`. Memory and stream draw different outliers
from the same job (seeded permutations vs a resampled, buffer-shuffled stream), so a resumed run
must keep the source it started with: the run records its choice (`to_json`) and a resume passes
it back as `recorded`, which wins over what the limit would pick today.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from oal_shared.errors import ConfigError
from oal_shared.fsio import atomic_write_bytes
from oal_shared.shards import OutlierManifest

logger = logging.getLogger(__name__)

SOURCES = ("stream", "memory")
# How a streamed run draws its outliers (data/stream.py). Recorded with the choice: a run that began
# streaming under an earlier draw (the per-sample pipeline, before shard blocks) is told on resume.
STREAM_DRAW = "shard-blocks-v1"
_FLOAT32 = 4
_INT64 = 8


def held_bytes(manifest: OutlierManifest) -> int:
    """Bytes InMemoryOutliers holds for a job: float32 latents and embeddings, an int64 class per sample.

    Latents are widened to float32 when held, so a float16 job takes twice its stored size.
    """
    layout = manifest.layout
    per_sample = (math.prod(layout.latent_shape) + layout.embed_dim) * _FLOAT32 + _INT64
    return manifest.num_samples * per_sample


@dataclass(frozen=True)
class OutlierSourceChoice:
    """The source a run reads outliers from, what the config asked for, and why."""

    source: Literal["stream", "memory"]
    configured: str  # the config's outlier_source: auto | stream | memory
    held_bytes: int  # what holding the job in memory takes
    limit_bytes: int  # OAL_OUTLIER_IN_MEMORY_MAX_MB when the choice was made
    reason: str

    def record(self) -> SourceRecord:
        return SourceRecord(self.source, STREAM_DRAW if self.source == "stream" else None)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "stream_draw": self.record().stream_draw,
            "configured": self.configured,
            "held_mb": round(self.held_bytes / 2**20, 3),
            "limit_mb": round(self.limit_bytes / 2**20, 3),
            "reason": self.reason,
        }


def choose_outlier_source(
    configured: str, manifest: OutlierManifest, limit_mb: int, recorded: str | None = None
) -> OutlierSourceChoice:
    """stream or memory for this job; `recorded` is the source a resumed run started with (auto only)."""
    if configured not in (*SOURCES, "auto"):
        raise ConfigError(f"outlier_source: expected 'auto', 'stream' or 'memory', got {configured!r}")
    if recorded is not None and recorded not in SOURCES:
        raise ConfigError(f"outlier_source recorded by the run: expected 'stream' or 'memory', got {recorded!r}")
    size, limit = held_bytes(manifest), limit_mb * 2**20
    sizes = (
        f"{manifest.num_samples} outliers of {manifest.layout.describe()} take {size / 2**20:.1f} MB "
        f"as float32 tensors, limit OAL_OUTLIER_IN_MEMORY_MAX_MB={limit_mb}"
    )
    if configured != "auto":
        return OutlierSourceChoice(configured, configured, size, limit, f"outlier_source={configured} ({sizes})")  # type: ignore[arg-type]
    by_size = "memory" if size <= limit else "stream"
    if recorded is not None:
        reason = f"auto, resumed with the source the run started with ({sizes})"
        if recorded != by_size:
            logger.warning(
                "Outliers: the run started with %s and keeps it on resume (the outliers drawn depend on "
                "the source), though the limit now picks %s: %s",
                recorded,
                by_size,
                sizes,
            )
        return OutlierSourceChoice(recorded, configured, size, limit, reason)  # type: ignore[arg-type]
    verdict = "fits, held in memory" if by_size == "memory" else "exceeds it, streamed from the shards"
    return OutlierSourceChoice(by_size, configured, size, limit, f"auto: {sizes}: {verdict}")


@dataclass(frozen=True)
class SourceRecord:
    """What a run wrote when it chose its source: the source, and the stream's draw (None for memory)."""

    source: Literal["stream", "memory"]
    stream_draw: str | None


def read_source_record(path: Path) -> SourceRecord | None:
    """The record a run wrote next to its checkpoint (`write_source_record`), or None without one."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        source = record["source"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: unreadable record of the run's outlier source ({exc}); start over in a new --out"
        ) from exc
    if source not in SOURCES:
        raise ConfigError(f"{path}: source: expected 'stream' or 'memory', got {source!r}")
    return SourceRecord(source, record.get("stream_draw"))


def write_source_record(path: Path, choice: OutlierSourceChoice) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(choice.to_json(), indent=2).encode())


def warn_if_the_stream_draw_changed(record: SourceRecord | None, path: Path) -> None:
    """A run that began streaming under another draw resumes under today's: the outliers differ from then on."""
    if record is not None and record.source == "stream" and record.stream_draw != STREAM_DRAW:
        logger.warning(
            "Outliers: %s says this run began streaming with the draw %s; it resumes with %s (whole shards "
            "through a seeded pool), so outliers from here on differ from those of a run that never stopped",
            path,
            record.stream_draw or "of the per-sample pipeline (an earlier version)",
            STREAM_DRAW,
        )
