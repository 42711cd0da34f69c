"""Build a training run for the loop in fit.py: where we run -> data -> models -> optimisers -> resume.

`build_run` returns a `Run`: the ID data, the student inside its `OALObjective` (with the adapter DT,
CLUB q-nets and projector P the recipe needs), the teacher and outliers that feed each `StepBatch`,
one SGD and one schedule per trained part, and where a resumed run stands. `Run.batches(epoch)`
yields the epoch's StepBatches, every source of randomness seeded by (seed, epoch, rank).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from oal_shared.data.benchmark import Benchmark, load_benchmark
from oal_shared.errors import ConfigError
from oal_shared.schedules import warmup_cosine
from oal_shared.settings import Settings
from oal_trainer.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    MODEL_FILE,
    TrainingState,
    load_checkpoint,
    save_checkpoint,
)
from oal_trainer.data import (
    IDTrainSet,
    augment_batch,
    black_pixel,
    id_loader,
    id_train_set,
    seeded_generator,
    steps_per_epoch,
)
from oal_trainer.distributed import DistContext, init_distributed, rank0_first, wrap_model
from oal_trainer.objective import OALObjective, StepBatch, TrainModules
from oal_trainer.recipes import RUNTIME_FIELDS, TrainConfig
from oal_trainer.run_models import build_student, teacher_model
from oal_trainer.run_outliers import PixelOutliers, RunOutliers, open_outliers, open_pixel_outliers
from oal_trainer.scorers import get_scorer
from oal_trainer.teacher import LoadedRun, TeacherOutputs, cached_teacher_outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Teacher:
    """z_t and h_t for a step's images: looked up by training row in the cache, or a live forward."""

    run: LoadedRun
    cache: TeacherOutputs | None
    device: torch.device

    def outputs(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            rows_cpu = rows.cpu()
            return self.cache.logits[rows_cpu].to(self.device), self.cache.features[rows_cpu].to(self.device)
        with torch.no_grad():
            return self.run.model(x, return_feature=True)  # (B, K), (B, D_t)


@dataclass(eq=False)
class Run:
    """Everything the loop needs; built by `build_run`."""

    config: TrainConfig
    run_dir: Path
    ctx: DistContext
    benchmark: Benchmark
    train: IDTrainSet
    steps_per_epoch: int
    pad_value: torch.Tensor  # the standardised black pixel, what augmentation pads with
    student: nn.Module  # bare (not DDP-wrapped): checkpoints, final weights, evaluation
    objective: OALObjective
    init_run: LoadedRun | None
    teacher: Teacher | None
    outliers: RunOutliers | None
    pixels: PixelOutliers | None
    optimizers: dict[str, torch.optim.Optimizer]  # one SGD per trained part, "student" first
    schedulers: dict[str, LRScheduler]  # same keys
    state: TrainingState
    settings: Settings | None = None  # the deployment settings the run was built with (evaluation reuses them)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "aux": self.objective.aux}

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE

    @property
    def lr(self) -> float:
        """The student's learning rate for the next step."""
        return self.optimizers["student"].param_groups[0]["lr"]

    def save_checkpoint(self, grad_scaler: dict | None = None) -> None:
        """The resumable state; `grad_scaler` (fp16's GradScaler state) so an fp16 run resumes at its scale."""
        save_checkpoint(
            self.checkpoint_path,
            self.modules,
            self.optimizers,
            self.state,
            self.config.resume_key(),
            self.schedulers,
            grad_scaler=grad_scaler,
        )

    def batches(self, epoch: int) -> Iterator[StepBatch]:
        """The epoch's StepBatches: ID order and augmentation seeded by (data seed, epoch, rank), the outlier
        draw by (outlier seed, epoch, rank)."""
        config, ctx = self.config, self.ctx
        augment_gen = seeded_generator(config.effective_data_seed, "augment", epoch, ctx.rank)
        loader = id_loader(
            self.train,
            config.batch_size,
            config.effective_data_seed,
            epoch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_workers=config.num_workers,
        )
        outlier_batches = self.outliers.source.epoch(epoch) if self.outliers is not None else None
        pad_value = self.pad_value.to(ctx.device)
        for x, y, rows in loader:
            x = x.to(ctx.device, non_blocking=True)
            y = y.to(ctx.device, non_blocking=True)
            if config.augment:
                x = augment_batch(x, augment_gen, config.crop_padding, config.hflip, pad_value)
            x = self._memory_format(x)
            parts: dict[str, torch.Tensor | None] = {}
            if self.teacher is not None:
                parts["teacher_logits"], parts["teacher_features"] = self.teacher.outputs(x, rows)
            if outlier_batches is not None:
                outliers = next(outlier_batches)
                parts["outlier_embeddings"] = outliers.embeddings.to(ctx.device)
                parts["outlier_latents"] = outliers.latents.to(ctx.device)
                if self.pixels is not None:
                    parts["outlier_images"] = self._memory_format(self.pixels.images(outliers, ctx.device))
            yield StepBatch(images=x, labels=y, **parts)

    def _memory_format(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_train_set(benchmark: Benchmark, config: TrainConfig, settings: Settings) -> IDTrainSet:
    """The run's ID training rows (seeded subset), held or streamed as the settings size them."""
    return id_train_set(
        benchmark,
        config.train_subset,
        config.effective_data_seed,
        in_memory_max_bytes=settings.id_in_memory_max_mb * 2**20,
        stream_workers=settings.id_stream_workers,
    )


def build_run(config: TrainConfig, run_dir: Path, settings: Settings) -> Run:
    """Everything a run needs, in the order that keeps weight initialisation under the seed."""
    # Where we run
    ctx = init_distributed(config.device if config.device != "auto" else settings.device)
    threads = config.threads or settings.torch_threads
    if threads:
        torch.set_num_threads(threads)
    seed_everything(config.seed)
    if config.evaluate:  # an unknown scorer, or a detector without its extra, fails now, not after training
        for name in config.eval_scorers:
            get_scorer(name)
    if (run_dir / MODEL_FILE).exists():
        raise ConfigError(
            f"--out {run_dir}: already holds a finished run ({MODEL_FILE}); choose another folder, "
            "or use `oal-train eval` to re-evaluate it"
        )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # Data
    benchmark = load_benchmark(config.benchmark, settings)
    train = run_train_set(benchmark, config, settings)
    steps_per_ep = steps_per_epoch(len(train), config.batch_size, ctx.world_size)
    if steps_per_ep < 1:
        raise ConfigError(
            f"batch_size: {config.batch_size} x {ctx.world_size} ranks exceeds the {len(train)} ID images"
        )

    # Models: the student first (initialised under the seed), then what feeds and helps it
    student, init_run = build_student(config, benchmark, ctx.device)
    cache_dir = Path(config.cache_dir or Path(settings.artifact_dir) / "trainer-cache")
    teacher = _load_teacher(config, benchmark, train, ctx, cache_dir) if config.uses_teacher else None
    outliers = open_outliers(config, steps_per_ep, ctx, settings, run_dir) if config.uses_outliers else None
    pixels = None
    if config.outlier_space == "pixel" and outliers is not None:
        pixels = open_pixel_outliers(config, benchmark, ctx, cache_dir, outliers.source.manifest)
    aux = TrainModules.for_config(
        config,
        student.feature_dim,
        teacher_dim=teacher.run.model.feature_dim if teacher is not None else None,
        embed_dim=outliers.source.embed_dim if outliers is not None else None,
        latent_shape=outliers.source.latent_shape if outliers is not None else None,
    ).to(ctx.device)
    objective = OALObjective(wrap_model(student, ctx), aux, config)

    # Optimisers and schedules, then the checkpoint if the run dir holds one
    optimizers = _optimizers(config, student, aux)
    total_steps = config.epochs * steps_per_ep
    schedulers = {
        name: warmup_cosine(optimizer, total_steps, config.warmup_steps, config.min_lr_ratio)
        for name, optimizer in optimizers.items()
    }
    run = Run(
        config=config,
        run_dir=run_dir,
        ctx=ctx,
        benchmark=benchmark,
        train=train,
        steps_per_epoch=steps_per_ep,
        pad_value=black_pixel(benchmark.mean, benchmark.std),
        student=student,
        objective=objective,
        init_run=init_run,
        teacher=teacher,
        outliers=outliers,
        pixels=pixels,
        optimizers=optimizers,
        schedulers=schedulers,
        state=TrainingState(epoch=0, step=0),
        settings=settings,
    )
    if run.checkpoint_path.exists():
        run.state = load_checkpoint(
            run.checkpoint_path,
            run.modules,
            optimizers,
            config.resume_key(),
            schedulers,
            key_defaults=TrainConfig.resume_key_defaults(),
            runtime_fields=RUNTIME_FIELDS,
        )
        logger.info("Resuming %s from epoch %d (step %d)", run_dir, run.state.epoch, run.state.step)
    return run


def _load_teacher(
    config: TrainConfig, benchmark: Benchmark, train: IDTrainSet, ctx: DistContext, cache_dir: Path
) -> Teacher:
    loaded = teacher_model(config, benchmark)
    loaded.model.to(ctx.device)
    if config.channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    cache = None
    if config.teacher_mode == "cache":
        cache = rank0_first(
            ctx,
            lambda write: cached_teacher_outputs(
                loaded,
                train.images,
                cache_dir,
                batch_size=config.eval_batch_size,
                device=ctx.device,
                channels_last=config.channels_last,
                write=write,
            ),
        )
    return Teacher(loaded, cache, ctx.device)


def _optimizers(config: TrainConfig, student: nn.Module, aux: TrainModules) -> dict[str, torch.optim.Optimizer]:
    """One SGD per trained part, each at its own peak lr (docs/METHOD.md, Stage D).

    Separate optimisers rather than param groups of one: torch's cosine floor (eta_min) is one number
    per optimiser, and min_lr_ratio must floor each part at its own fraction of its peak. SGD's update
    is per parameter, so the split changes no number.
    """
    peak_lrs = {"adapter": config.lr_adapter, "club_emb": config.lr_club, "club_latent": config.lr_club}
    peak_lrs["projector"] = config.lr_projector
    parts = [("student", student, config.lr), *((name, module, peak_lrs[name]) for name, module in aux.named_parts())]
    return {
        name: torch.optim.SGD(
            [{"params": list(module.parameters()), "lr": lr, "name": name}],
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        for name, module, lr in parts
    }
