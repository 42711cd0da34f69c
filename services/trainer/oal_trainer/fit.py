"""Stage D then E: fit a student by the run's recipe, checkpoint each epoch, evaluate into the run dir.

Reads top-down, as nanoGPT's train.py does: build the run (oal_trainer.run: data, models, optimisers,
resume) -> the loop (per step: the objective of oal_trainer.objective on one StepBatch, one backward,
one SGD step and one schedule step per trained part) -> final weights -> evaluation (Stage E). The
objective and its terms are in docs/METHOD.md, Stage D.

A CPU run repeats exactly for a seed: weights are initialised under the seed, and every source of
randomness per epoch (ID order, augmentation, outlier draw) is seeded by (seed, epoch, rank). So a run
resumed from its last epoch checkpoint (weights, optimisers, lr schedules) ends with the same weights
as one never interrupted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oal_shared.settings import Settings, get_settings
from oal_trainer.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TrainingState,
    read_grad_scaler_state,
    save_weights,
)
from oal_trainer.data import slice_benchmark
from oal_trainer.distributed import (
    DistContext,
    barrier,
    check_replicas_agree,
    mean_across_ranks,
    resolve_device,
    shutdown,
)
from oal_trainer.loss_sums import FiniteWatch, TensorSums, detached_values
from oal_trainer.models import count_parameters
from oal_trainer.precision import Precision, autocast_each, check_amp_device
from oal_trainer.recipes import TrainConfig, save_config
from oal_trainer.run import Run, build_run, run_train_set
from oal_trainer.teacher import LoadedRun

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "run.json"
TRAIN_LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class StepInfo:
    """What the loop reports after each optimiser step (rank 0), e.g. to a progress bar."""

    epoch: int
    step: int  # steps taken so far, over the whole run
    total_steps: int
    loss_tensors: dict[str, torch.Tensor]  # this step's terms and "loss", detached 0-d tensors on the device
    lr: float  # the student's lr for this step
    samples_per_s: float  # ID images per second since the previous step (all ranks)

    @cached_property
    def losses(self) -> dict[str, float]:
        """This step's unweighted terms and "loss" (the weighted total) as numbers.

        Reading them waits for the device to finish the step, so the loop itself never does: only
        a hook that asks pays that sync (a hook that reads them every Nth step pays it every Nth)."""
        return {name: float(value) for name, value in self.loss_tensors.items()}


@dataclass
class FitHooks:
    """Callbacks the CLI (progress bar) and tests (interruptions) hang on the loop; all optional."""

    on_start: Callable[[int, int], None] | None = None  # (start_step, total_steps)
    on_step: Callable[[StepInfo], None] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None  # (epochs done, mean losses)
    on_finish: Callable[[FitResult], None] | None = None  # after the final weights and evaluation


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    epochs: int
    steps: int
    metrics: dict[str, Any] | None  # None on ranks other than 0
    files: dict[str, Path] = field(default_factory=dict)


def fit(
    config: TrainConfig,
    run_dir: Path,
    *,
    settings: Settings | None = None,
    hooks: FitHooks | None = None,
) -> FitResult:
    """Train by `config` into `run_dir` (resuming from its checkpoint if one is there), then evaluate."""
    hooks = hooks or FitHooks()
    started = time.perf_counter()
    settings = settings or get_settings()
    # Before anything is built or cached: an amp the device cannot run is a config error.
    check_amp_device(config.amp, resolve_device(config.device if config.device != "auto" else settings.device))
    run = build_run(config, Path(run_dir), settings)
    precision = Precision(config.amp, run.ctx.device)
    if run.state.step > 0:  # resumed: the loss scale goes on where the checkpoint left it
        precision.load_state_dict(read_grad_scaler_state(run.checkpoint_path))
    if config.tensorboard and run.ctx.is_main:
        from oal_trainer.tensorboard_log import tensorboard_hooks

        hooks = tensorboard_hooks(run.run_dir, hooks, every=run.config.log_interval)
    _start(run, hooks)
    log = IntervalLog(run)
    step = run.state.step
    for epoch in range(run.state.epoch, config.epochs):
        step, epoch_means = train_epoch(run, epoch, step, hooks, log, precision)
        run.state = TrainingState(epoch=epoch + 1, step=step)
        if run.ctx.is_main:
            run.save_checkpoint(grad_scaler=precision.state_dict())
            if hooks.on_epoch_end:
                hooks.on_epoch_end(epoch + 1, epoch_means)
        barrier(run.ctx)
    train_seconds = time.perf_counter() - started
    check_replicas_agree(run.modules, run.ctx)
    result = (
        _finish(run, train_seconds, precision)
        if run.ctx.is_main
        else FitResult(run.run_dir, run.state.epoch, step, None)
    )
    if run.ctx.is_main and hooks.on_finish:
        hooks.on_finish(result)
    barrier(run.ctx)
    shutdown(run.ctx)
    return result


def train_epoch(
    run: Run, epoch: int, step: int, hooks: FitHooks, log: IntervalLog, precision: Precision | None = None
) -> tuple[int, dict[str, float]]:
    """One pass over the ID data from global step `step`; returns the step after it and the mean losses.

    Batches (with the live teacher and pixel decode) and the objective run under `precision`'s
    autocast; backward and the optimiser steps go through its GradScaler (fp16) or plainly."""
    precision = precision or Precision("off", run.ctx.device)
    ctx = run.ctx
    run.objective.train()
    aux_params = list(run.objective.aux.parameters())
    # Sums stay on the device and the finiteness check is deferred (FiniteWatch): a `.item()` or an
    # `if` on a device tensor each step would make the host wait for every step before queueing the
    # next. Numbers come back to the host at the log interval and the epoch's end, in float64 and in
    # step order, so they are the same floats the per-step `.item()` sums gave.
    epoch_sums = TensorSums()
    # The watch looks at the loss itself, never at fp16's scaled gradients: a step the GradScaler
    # skips for overflowing gradients has a finite loss and is no error.
    watch = FiniteWatch(hint=precision.not_finite_hint)
    last = time.perf_counter()
    for batch in autocast_each(run.batches(epoch), precision):
        with precision.autocast():
            losses = run.objective(batch)
        watch.add(losses, step, epoch)
        for optimizer in run.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        precision.backward(losses.to_backward)
        if ctx.enabled and aux_params:
            _average_gradients(aux_params, ctx)  # DDP averages the student's; these are outside it
        lr = run.lr
        precision.step(run.optimizers.values())
        for scheduler in run.schedulers.values():
            scheduler.step()
        step += 1

        values = detached_values(losses)
        epoch_sums.add(values)
        samples = len(batch.images) * ctx.world_size
        now = time.perf_counter()
        if ctx.is_main and hooks.on_step:
            hooks.on_step(StepInfo(epoch, step, run.total_steps, values, lr, samples / max(now - last, 1e-9)))
        last = now
        log.add(values, samples)
        if step % run.config.log_interval == 0 or step == run.total_steps:
            watch.check()  # before anything of these steps is logged
            log.write(epoch, step, lr)
    watch.check()  # before the epoch's checkpoint is saved
    return step, {name: value / run.steps_per_epoch for name, value in epoch_sums.floats().items()}


class IntervalLog:
    """Mean losses over `log_interval` steps, averaged over ranks: a log line and a train_log.jsonl record."""

    def __init__(self, run: Run):
        self.run = run
        self._reset()

    def _reset(self) -> None:
        self.sums = TensorSums()
        self.steps = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor], samples: int) -> None:
        self.sums.add(values)
        self.steps += 1
        self.samples += samples

    def write(self, epoch: int, step: int, lr: float) -> None:
        elapsed = time.perf_counter() - self.started
        means = mean_across_ranks({k: v / self.steps for k, v in self.sums.floats().items()}, self.run.ctx)
        rate = self.samples / max(elapsed, 1e-9)
        if self.run.ctx.is_main:
            _log_interval(self.run.run_dir, epoch, step, self.run.total_steps, means, lr, rate)
        self._reset()


def _start(run: Run, hooks: FitHooks) -> None:
    """Rank 0: the run's config.json, one line on what is trained, the on_start hook."""
    if not run.ctx.is_main:
        return
    config = run.config
    save_config(config, run.run_dir / CONFIG_FILE)
    logger.info(
        "Run %s: recipe %s, %s (%d params), %d ID images, %d steps/epoch x %d epochs, %d rank(s) on %s",
        run.run_dir,
        config.recipe,
        config.model,
        count_parameters(run.student),
        len(run.train),
        run.steps_per_epoch,
        config.epochs,
        run.ctx.world_size,
        run.ctx.device,
    )
    if hooks.on_start:
        hooks.on_start(run.state.step, run.total_steps)


def _finish(run: Run, train_seconds: float, precision: Precision) -> FitResult:
    """Rank 0: final weights, evaluation (Stage E) into the run dir, and run.json on what shaped the run."""
    config, benchmark, run_dir = run.config, run.benchmark, run.run_dir
    weights_meta = {
        "model": config.model,
        "num_classes": str(benchmark.num_classes),
        "in_channels": str(benchmark.in_channels),
        "recipe": config.recipe,
        "benchmark": config.benchmark,
    }
    save_weights(run.student, run_dir / MODEL_FILE, weights_meta)

    eval_start = time.perf_counter()
    metrics, files = None, {}
    if config.evaluate:
        metrics, files = evaluate_run(run.student, benchmark, config, run.ctx.device, run_dir, settings=run.settings)
    run_info = {
        "benchmark": {
            "name": benchmark.name,
            "class_names": list(benchmark.class_names),
            "mean": list(benchmark.mean),
            "std": list(benchmark.std),
        },
        "model": {
            "name": config.model,
            "parameters": count_parameters(run.student),
            "feature_dim": run.student.feature_dim,
        },
        "train_images": len(run.train),
        "steps_per_epoch": run.steps_per_epoch,
        "epochs": run.state.epoch,
        "steps": run.state.step,
        "world_size": run.ctx.world_size,
        "device": str(run.ctx.device),
        "seeds": run_seeds(run),
        "skipped_images": {
            image_set.name: len(image_set.skipped_files)
            for image_set in (benchmark.id_train, benchmark.id_test, *benchmark.ood_sets())
            if getattr(image_set, "skipped_files", None)
        },
        "teacher": _run_ref(run.teacher.run if run.teacher is not None else None),
        "init_from": _run_ref(run.init_run),
        "outliers": run.outliers.record() if run.outliers is not None else None,
        "seconds": {"train": round(train_seconds, 2), "eval": round(time.perf_counter() - eval_start, 2)},
        "precision": {**precision.record(), "compile": config.compile, "channels_last": config.channels_last},
        "torch": torch.__version__,
    }
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
    return FitResult(run_dir, run.state.epoch, run.state.step, metrics, {**files, "model": run_dir / MODEL_FILE})


def evaluate_run(
    model: nn.Module,
    benchmark,
    config: TrainConfig,
    device: torch.device,
    run_dir: Path,
    *,
    settings: Settings | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Stage E on the (sliced) benchmark with the run's scorers; writes metrics.json and friends.

    Fitted scorers (ViM, KNN, ...) fit on the run's own ID training images, never the test sets;
    their features are cached in the run dir (oal_trainer.id_features)."""
    from oal_trainer.evaluate import evaluate_model
    from oal_trainer.evaluate_outputs import write_eval_outputs
    from oal_trainer.id_features import ID_FEATURES_FILE
    from oal_trainer.scorers import needs_fit

    eval_benchmark = slice_benchmark(benchmark, config.eval_subset, config.seed)
    fit_set = None
    if needs_fit(config.eval_scorers):
        # held or streamed exactly as in training, so a large set is not held for the detectors either
        fit_set = run_train_set(benchmark, config, settings or get_settings())
    result = evaluate_model(
        model,
        eval_benchmark,
        scorers=config.eval_scorers,
        batch_size=config.eval_batch_size,
        device=device,
        id_train=fit_set,
        features_cache=Path(run_dir) / ID_FEATURES_FILE,
    )
    files = write_eval_outputs(run_dir, result)
    metrics = result.metrics()
    logger.info("Evaluation of %s: ID accuracy %.4f", run_dir, metrics["id_accuracy"])
    return metrics, files


def _average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    import torch.distributed as dist

    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= ctx.world_size


def _log_interval(
    run_dir: Path, epoch: int, step: int, total: int, means: dict[str, float], lr: float, rate: float
) -> None:
    terms = " ".join(f"{k} {v:.4f}" for k, v in sorted(means.items()) if k != "loss")
    logger.info(
        "epoch %d step %d/%d: loss %.4f (%s), lr %.2e, %.0f samples/s",
        epoch + 1,
        step,
        total,
        means.get("loss", float("nan")),
        terms,
        lr,
        rate,
    )
    record = {"epoch": epoch + 1, "step": step, "lr": lr, "samples_per_s": rate, **means}
    with open(run_dir / TRAIN_LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def run_seeds(run: Run) -> dict[str, int | None]:
    """Every seed that shaped this run, by what it varies (docs/TRAINER.md, Sweeps): this run's own
    three, the seed of the run its student started from, and the synthesis seed of its outliers."""
    config = run.config
    init_seed = None
    if run.init_run is not None:
        init_config = Path(run.init_run.run_dir) / "config.json"
        if init_config.is_file():
            init_seed = json.loads(init_config.read_text(encoding="utf-8")).get("seed")
    job_spec = run.outliers.job_spec if run.outliers is not None else None
    return {
        "weights": config.seed,
        "data": config.effective_data_seed,
        "outliers": config.effective_outlier_seed,
        "init_run": init_seed,
        "synthesis": job_spec.get("seed") if isinstance(job_spec, dict) else None,
    }


def _run_ref(run: LoadedRun | None) -> dict[str, str] | None:
    if run is None:
        return None
    return {"run_dir": str(run.run_dir), "model": run.model_name, "weights_sha256": run.weights_sha256}
