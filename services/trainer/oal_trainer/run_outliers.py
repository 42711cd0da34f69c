"""The outlier side of a training run (oal_trainer.run): the shard source that feeds each step, its
provenance for run.json, and in pixel space the decoder that turns latents into images.

`open_outliers` opens the job folder as a stream or held in memory and keeps that choice across a
resume; `open_pixel_outliers` loads the generator's VAE and, when asked, the decoded cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oal_shared.data.benchmark import Benchmark
from oal_shared.settings import Settings
from oal_shared.shards import OutlierManifest, load_manifest
from oal_trainer.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE
from oal_trainer.data import (
    InMemoryOutliers,
    OutlierBatch,
    OutlierSource,
    OutlierSourceChoice,
    OutlierStream,
    choose_outlier_source,
    read_source_record,
    warn_if_the_stream_draw_changed,
    write_source_record,
)
from oal_trainer.distributed import DistContext, rank0_first
from oal_trainer.recipes import TrainConfig

if TYPE_CHECKING:  # decode pulls in diffusers; only pixel-space runs import it
    from oal_trainer.decode import DecodedOutliers, PixelDecoder

# The run's logger, as before this module was split from run.py: the run's log lines keep one name.
logger = logging.getLogger("oal_trainer.run")

OUTLIER_CHOICE_FILE = "outlier_source.json"  # next to the checkpoint: the source a resume must keep


@dataclass(eq=False)
class RunOutliers:
    """The outlier source of a run and the provenance its run.json records."""

    config: TrainConfig
    source: OutlierSource
    job_spec: dict[str, Any]  # the manifest's "spec": the synthesis job that made the outliers
    choice: OutlierSourceChoice  # stream or memory, and why (outlier_source=auto sizes the job)

    def record(self) -> dict[str, Any]:
        stats = self.source.stats
        return {
            "shards": self.config.shards,
            "source": self.choice.source,  # the one used; "source_choice" has the config's value and why
            "source_choice": self.choice.to_json(),
            "reader_workers": getattr(self.source, "workers", None),  # the stream's; None when held in memory
            "space": self.config.outlier_space,
            "latent_shape": list(self.source.latent_shape),
            "embed_dim": self.source.embed_dim,
            "samples_read": stats.samples,
            "batches": stats.batches,
            "skipped": stats.skipped,
            "errors": stats.errors[:20],
            "job_spec": self.job_spec,
        }


@dataclass(frozen=True, eq=False)
class PixelOutliers:
    """Outlier latents as images (pixel space): looked up in the decoded cache, or decoded per batch."""

    decoder: PixelDecoder
    decoded: DecodedOutliers | None  # pixel_decode=precompute

    def images(self, batch: OutlierBatch, device: torch.device) -> torch.Tensor:
        if self.decoded is not None:
            return self.decoded.lookup(batch.keys).to(device)  # (B, C, H, W)
        return self.decoder.decode(batch.latents)


def open_outliers(
    config: TrainConfig, steps_per_ep: int, ctx: DistContext, settings: Settings, run_dir: Path
) -> RunOutliers:
    """The run's outlier source (stream or memory) over the job folder `config.shards`, and its provenance.

    outlier_source=auto holds the job in memory when it fits `OAL_OUTLIER_IN_MEMORY_MAX_MB`
    (sized from the manifest), else streams it. The choice is written next to the checkpoint;
    a resumed run takes the source from there, since memory and stream draw different outliers
    and a changed setting must not change them halfway. The source opens the job's manifest
    first (refusing a folder without one); the job spec recorded in run.json is the manifest's.
    """
    shards = Path(config.shards)  # type: ignore[arg-type]
    record_path = run_dir / CHECKPOINT_DIR / OUTLIER_CHOICE_FILE
    resuming = (run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()
    record = read_source_record(record_path) if resuming else None
    if resuming and record is None and config.outlier_source == "auto":
        logger.warning("Outliers: %s records no outlier source; choosing it again from the job's size", record_path)
    choice = choose_outlier_source(
        config.outlier_source,
        load_manifest(shards),
        settings.outlier_in_memory_max_mb,
        recorded=record.source if record else None,
    )
    logger.info("Outliers from %s: %s (%s)", shards, choice.source, choice.reason)
    warn_if_the_stream_draw_changed(record, record_path)
    if ctx.is_main and (record is None or record != choice.record()):
        write_source_record(record_path, choice)
    common = {
        "batch_size": config.outliers_per_step,
        "steps_per_epoch": steps_per_ep,
        "seed": config.effective_outlier_seed,
        "on_bad_shard": config.on_bad_shard,
        "rank": ctx.rank,
    }
    if choice.source == "stream":
        workers = reader_workers(config, ctx)
        source = OutlierStream(shards, shuffle_buffer=config.shuffle_buffer, workers=workers, **common)
    else:
        source = InMemoryOutliers(shards, **common)
    return RunOutliers(config, source, source.manifest.spec, choice)


def reader_workers(config: TrainConfig, ctx: DistContext) -> int:
    """The stream's reader processes: the config's, else none on the CPU and one beside a GPU.

    On the CPU the training threads fill the cores, and a reader process beside them slows a step
    more than reading in the training process does (0.92 against 0.99 of the in-memory rate on two
    cores, docs/BENCHMARKS.md); beside a GPU the training process's thread is the one to keep free.
    """
    if config.outlier_workers is not None:
        return config.outlier_workers
    return 0 if ctx.device.type == "cpu" else 1


def open_pixel_outliers(
    config: TrainConfig, benchmark: Benchmark, ctx: DistContext, cache_dir: Path, manifest: OutlierManifest
) -> PixelOutliers:
    """The generator's VAE, checked against the manifest's generator hash, and the decoded cache if asked."""
    from oal_trainer.decode import DecodedOutliers, PixelDecoder

    decoder = PixelDecoder(
        Path(config.generator_dir),  # type: ignore[arg-type]
        image_size=benchmark.image_size,
        in_channels=benchmark.in_channels,
        mean=benchmark.mean,
        std=benchmark.std,
        device=ctx.device,
        manifest=manifest,
    )
    decoded = None
    if config.pixel_decode == "precompute":
        decoded = rank0_first(
            ctx,
            lambda write: DecodedOutliers(
                decoder,
                manifest,
                cache_dir,
                batch_size=config.eval_batch_size,
                on_bad_shard=config.on_bad_shard,
                write=write,
            ),
        )
    return PixelOutliers(decoder, decoded)


# Also what run.py's teacher cache is built with; here, so run.py imports this module and not the reverse.
