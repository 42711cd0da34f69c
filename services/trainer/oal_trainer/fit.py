"""Stage D then E: fit a student by the run's recipe, checkpoint each epoch, evaluate into the run dir.

Read top-down (nanoGPT's train.py): where we run -> data -> models -> optimiser -> resume -> the
loop -> final weights -> evaluation. Per step, with B ID images (x, y) and B outliers (v, z0):

    L = w_ce CE(z_s, y)
      + w_logit_kd KL(softmax(z_t/T) || softmax(z_s/T)) T^2        teacher logits z_t (cached or live)
      + w_feature_kd KL(softmax(DT(h_t)) || softmax(h_s))          DT: trained adapter
      + w_club_emb CLUB(v, h_s) + w_club_latent CLUB(f_ood, h_s)   f_ood = reduce(z0)
      [+ q-fit NLL of each CLUB when club_mode = alternating]
      + w_energy Energy(z_s, z_ood) + w_oe OE(z_ood)
    z_ood = head(P(f_ood)) for latent outliers, or the student's logits on decoded images (pixel).

A CPU run repeats exactly for a seed: weights are initialised under the seed, and every source of
randomness per epoch (ID order, augmentation, outlier draw) is seeded by (seed, epoch, rank). So a run
resumed from its last epoch checkpoint ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oal_shared.data.benchmark import load_benchmark
from oal_shared.errors import ConfigError
from oal_shared.settings import Settings, get_settings
from oal_trainer.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    TrainingState,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from oal_trainer.data import (
    InMemoryOutliers,
    OutlierBatch,
    OutlierSource,
    OutlierStream,
    augment_batch,
    black_pixel,
    id_loader,
    id_train_set,
    reduce_latents,
    reduced_latent_dim,
    seeded_generator,
    shard_urls,
    slice_benchmark,
    steps_per_epoch,
)
from oal_trainer.distributed import (
    DistContext,
    barrier,
    check_replicas_agree,
    init_distributed,
    mean_across_ranks,
    shutdown,
    unwrap,
    wrap_model,
)
from oal_trainer.models import OutlierProjector, build_model, count_parameters
from oal_trainer.recipes import TrainConfig, save_config
from oal_trainer.teacher import LoadedRun, cached_teacher_outputs, load_run_model, load_teacher

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "run.json"
TRAIN_LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class StepInfo:
    """What the loop reports after each optimiser step (rank 0), e.g. to a progress bar."""

    epoch: int
    step: int  # steps taken so far, over the whole run
    total_steps: int
    losses: dict[str, float]  # this step's unweighted terms and "loss" (the weighted total)
    lr: float
    samples_per_s: float


@dataclass
class FitHooks:
    """Callbacks the CLI (progress bar) and tests (interruptions) hang on the loop; all optional."""

    on_start: Callable[[int, int], None] | None = None  # (start_step, total_steps)
    on_step: Callable[[StepInfo], None] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None  # (epochs done, mean losses)


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    epochs: int
    steps: int
    metrics: dict[str, Any] | None  # None on ranks other than 0
    files: dict[str, Path] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """lr multiplier at `step`: linear warm-up, then cosine from 1 down to min_ratio at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainModules(nn.Module):
    """Everything trained besides the student: adapter DT, CLUB q-nets, outlier projector P.

    One container so checkpoints, the optimiser groups and the gradient all-reduce treat them alike.
    """

    def __init__(self):
        super().__init__()
        self.adapter: nn.Module | None = None
        self.club_emb: nn.Module | None = None
        self.club_latent: nn.Module | None = None
        self.projector: nn.Module | None = None


def fit(
    config: TrainConfig,
    run_dir: Path,
    *,
    settings: Settings | None = None,
    hooks: FitHooks | None = None,
) -> FitResult:
    """Train by `config` into `run_dir` (resuming from its checkpoint if one is there), then evaluate."""
    from oal_trainer.losses import (
        CLUB,
        FeatureAdapter,
        club_step_losses,
        energy_regularizer,
        feature_kd_loss,
        logit_kd_loss,
        outlier_exposure_loss,
    )

    settings = settings or get_settings()
    hooks = hooks or FitHooks()
    run_dir = Path(run_dir)

    # 1. Where we run --------------------------------------------------------------------------
    ctx = init_distributed(config.device if config.device != "auto" else settings.device)
    threads = config.threads or settings.torch_threads
    if threads:
        torch.set_num_threads(threads)
    seed_everything(config.seed)
    if (run_dir / MODEL_FILE).exists():
        raise ConfigError(
            f"--out {run_dir}: already holds a finished run ({MODEL_FILE}); choose another folder, "
            "or use `oal-train eval` to re-evaluate it"
        )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 2. Data ----------------------------------------------------------------------------------
    benchmark = load_benchmark(config.benchmark, settings)
    train = id_train_set(benchmark, config.train_subset, config.seed)
    steps_per_ep = steps_per_epoch(len(train), config.batch_size, ctx.world_size)
    total_steps = config.epochs * steps_per_ep
    if steps_per_ep < 1:
        raise ConfigError(
            f"batch_size: {config.batch_size} x {ctx.world_size} ranks exceeds the {len(train)} ID images"
        )
    pad_value = black_pixel(benchmark.mean, benchmark.std)

    # 3. Models --------------------------------------------------------------------------------
    num_classes, in_channels = benchmark.num_classes, benchmark.in_channels
    student = build_model(config.model, num_classes, in_channels)  # initialised under the seed
    init_run: LoadedRun | None = None
    if config.init_from:
        init_run = load_run_model(Path(config.init_from), "init_from", num_classes, in_channels)
        if init_run.model_name != config.model:
            raise ConfigError(
                f"init_from: {config.init_from} holds a {init_run.model_name!r} model, the config trains "
                f"{config.model!r}; set model={init_run.model_name} or pick another run"
            )
        student.load_state_dict(init_run.model.state_dict())
    student = student.to(ctx.device)
    if config.channels_last:
        student = student.to(memory_format=torch.channels_last)
    feature_dim = student.feature_dim

    cache_dir = Path(config.cache_dir or Path(settings.artifact_dir) / "trainer-cache")
    teacher: LoadedRun | None = None
    teacher_cache = None
    if config.uses_teacher:
        teacher = load_teacher(Path(config.teacher_run), num_classes, in_channels)  # type: ignore[arg-type]
        teacher.model.to(ctx.device)
        if config.channels_last:
            teacher.model.to(memory_format=torch.channels_last)
        if config.teacher_mode == "cache":
            teacher_cache = rank0_first(
                ctx,
                lambda write: cached_teacher_outputs(
                    teacher,
                    train.images,
                    cache_dir,
                    batch_size=config.eval_batch_size,
                    device=ctx.device,
                    channels_last=config.channels_last,
                    write=write,
                ),
            )

    outliers: OutlierSource | None = None
    if config.uses_outliers:
        source_cls = OutlierStream if config.outlier_source == "stream" else InMemoryOutliers
        extra = {}
        if config.outlier_source == "stream":
            extra = {"shuffle_buffer": config.shuffle_buffer, "workers": config.outlier_workers}
        outliers = source_cls(
            Path(config.shards),  # type: ignore[arg-type]
            batch_size=config.outliers_per_step,
            steps_per_epoch=steps_per_ep,
            seed=config.seed,
            on_bad_shard=config.on_bad_shard,
            rank=ctx.rank,
            **extra,
        )
    decoder = decoded = None
    if config.outlier_space == "pixel" and outliers is not None:
        from oal_trainer.decode import DecodedOutliers, PixelDecoder

        decoder = PixelDecoder(
            Path(config.generator_dir),  # type: ignore[arg-type]
            image_size=benchmark.image_size,
            in_channels=in_channels,
            mean=benchmark.mean,
            std=benchmark.std,
            device=ctx.device,
        )
        if config.pixel_decode == "precompute":
            decoded = rank0_first(
                ctx,
                lambda write: DecodedOutliers(
                    decoder,
                    shard_urls(Path(config.shards)),  # type: ignore[arg-type]
                    cache_dir,
                    batch_size=config.eval_batch_size,
                    on_bad_shard=config.on_bad_shard,
                    write=write,
                ),
            )

    aux = TrainModules()
    if config.w_feature_kd > 0 and teacher is not None:
        aux.adapter = FeatureAdapter(teacher.model.feature_dim, feature_dim)
    if outliers is not None:
        f_ood_dim = reduced_latent_dim(outliers.latent_shape, config.latent_reduce)
        if config.w_club_emb > 0:
            aux.club_emb = CLUB(outliers.embed_dim, feature_dim, config.club_hidden)
        if config.w_club_latent > 0:
            aux.club_latent = CLUB(f_ood_dim, feature_dim, config.club_hidden)
        if config.outlier_space == "latent" and (config.w_energy > 0 or config.w_oe > 0):
            aux.projector = OutlierProjector(f_ood_dim, feature_dim)
    aux.to(ctx.device)
    model = wrap_model(student, ctx)

    # 4. Optimiser: one SGD, a param group (own peak lr) per trained part -----------------------
    groups = [{"params": list(student.parameters()), "lr": config.lr, "name": "student"}]
    for name, module, lr in (
        ("adapter", aux.adapter, config.lr_adapter),
        ("club_emb", aux.club_emb, config.lr_club),
        ("club_latent", aux.club_latent, config.lr_club),
        ("projector", aux.projector, config.lr_projector),
    ):
        if module is not None:
            groups.append({"params": list(module.parameters()), "lr": lr, "name": name})
    for group in groups:
        group["peak_lr"] = group["lr"]
    optimizer = torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )

    # 5. Resume from the last epoch checkpoint, if the run dir has one ---------------------------
    checkpoint_path = run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
    state = TrainingState(epoch=0, step=0)
    modules = {"student": student, "aux": aux}
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, modules, {"sgd": optimizer}, config.resume_key())
        logger.info("Resuming %s from epoch %d (step %d)", run_dir, state.epoch, state.step)
    if ctx.is_main:
        save_config(config, run_dir / CONFIG_FILE)
        logger.info(
            "Run %s: recipe %s, %s (%d params), %d ID images, %d steps/epoch x %d epochs, %d rank(s) on %s",
            run_dir,
            config.recipe,
            config.model,
            count_parameters(student),
            len(train),
            steps_per_ep,
            config.epochs,
            ctx.world_size,
            ctx.device,
        )
        if hooks.on_start:
            hooks.on_start(state.step, total_steps)

    # 6. The loop ------------------------------------------------------------------------------
    step = state.step
    weights = {
        "ce": config.w_ce,
        "logit_kd": config.w_logit_kd,
        "feature_kd": config.w_feature_kd,
        "club_emb": config.w_club_emb,
        "club_latent": config.w_club_latent,
        "energy": config.w_energy,
        "oe": config.w_oe,
    }
    aux_params = list(aux.parameters())
    interval_sums: dict[str, float] = {}
    interval_steps = 0
    interval_start = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        student.train()
        aux.train()
        augment_gen = seeded_generator(config.seed, "augment", epoch, ctx.rank)
        loader = id_loader(
            train,
            config.batch_size,
            config.seed,
            epoch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_workers=config.num_workers,
        )
        outlier_batches = outliers.epoch(epoch) if outliers is not None else None
        epoch_sums: dict[str, float] = {}
        for x, y, rows in loader:
            step_start = time.perf_counter()
            factor = cosine_factor(step, total_steps, config.warmup_steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            x = x.to(ctx.device, non_blocking=True)
            y = y.to(ctx.device, non_blocking=True)
            if config.augment:
                x = augment_batch(x, augment_gen, config.crop_padding, config.hflip, pad_value.to(ctx.device))
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch: OutlierBatch | None = next(outlier_batches) if outlier_batches is not None else None

            terms: dict[str, torch.Tensor] = {}
            ood_images = None
            if batch is not None and decoded is not None:
                ood_images = decoded.lookup(batch.keys).to(ctx.device)  # (B, C, H, W)
            elif batch is not None and decoder is not None:
                ood_images = decoder.decode(batch.latents)
            if ood_images is not None:
                # Outlier exposure style: ID and outlier images in one forward (BatchNorm sees both).
                if config.channels_last:
                    ood_images = ood_images.contiguous(memory_format=torch.channels_last)
                logits_all, h_all = model(torch.cat([x, ood_images]), return_feature=True)
                logits, h_s, ood_logits = logits_all[: len(x)], h_all[: len(x)], logits_all[len(x) :]
            else:
                logits, h_s = model(x, return_feature=True)  # (B, K), (B, D_s)
                ood_logits = None
            terms["ce"] = F.cross_entropy(logits, y)

            if teacher is not None:
                if teacher_cache is not None:
                    rows_cpu = rows.cpu()
                    z_t = teacher_cache.logits[rows_cpu].to(ctx.device)  # (B, K)
                    h_t = teacher_cache.features[rows_cpu].to(ctx.device)  # (B, D_t)
                else:
                    with torch.no_grad():
                        z_t, h_t = teacher.model(x, return_feature=True)
                if config.w_logit_kd > 0:
                    terms["logit_kd"] = logit_kd_loss(logits, z_t, config.kd_temperature)
                if aux.adapter is not None:
                    terms["feature_kd"] = feature_kd_loss(h_s, aux.adapter(h_t))

            if batch is not None:
                v = batch.embeddings.to(ctx.device)  # (B, D_v)
                f_ood = reduce_latents(batch.latents.to(ctx.device), config.latent_reduce)  # (B, F)
                for name, club, x_club in (
                    ("club_emb", aux.club_emb, v),
                    ("club_latent", aux.club_latent, f_ood),
                ):
                    if club is not None:
                        bound, q_fit = club_step_losses(club, x_club, h_s, config.club_mode)
                        terms[name] = bound
                        if q_fit is not None:
                            terms[f"{name}_q"] = q_fit
                if aux.projector is not None:
                    ood_logits = unwrap(model).head(aux.projector(f_ood))  # (B, K)
                if ood_logits is not None:
                    if config.w_energy > 0:
                        terms["energy"] = energy_regularizer(
                            logits, ood_logits, config.energy_m_in, config.energy_m_out
                        )
                    if config.w_oe > 0:
                        terms["oe"] = outlier_exposure_loss(ood_logits)

            # The student's objective L; CLUB q-fit terms (alternating) only reach the q-nets, so they
            # join the backward pass but not the logged loss.
            loss = sum(weights[name] * value for name, value in terms.items() if not name.endswith("_q"))
            q_fit = sum(value for name, value in terms.items() if name.endswith("_q"))
            if not torch.isfinite(loss + q_fit):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} (epoch {epoch}); terms: "
                    + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                )
            optimizer.zero_grad(set_to_none=True)
            (loss + q_fit).backward()
            if ctx.enabled and aux_params:
                _average_gradients(aux_params, ctx)  # DDP averages the student's; these are outside it
            optimizer.step()
            step += 1

            values = {name: value.item() for name, value in terms.items()}
            values["loss"] = loss.item()
            for name, value in values.items():
                interval_sums[name] = interval_sums.get(name, 0.0) + value
                epoch_sums[name] = epoch_sums.get(name, 0.0) + value
            interval_steps += 1
            samples_per_s = len(x) * ctx.world_size / max(time.perf_counter() - step_start, 1e-9)
            if ctx.is_main and hooks.on_step:
                hooks.on_step(
                    StepInfo(epoch, step, total_steps, values, optimizer.param_groups[0]["lr"], samples_per_s)
                )
            if step % config.log_interval == 0 or step == total_steps:
                elapsed = time.perf_counter() - interval_start
                means = mean_across_ranks({k: v / interval_steps for k, v in interval_sums.items()}, ctx)
                rate = interval_steps * len(x) * ctx.world_size / max(elapsed, 1e-9)
                if ctx.is_main:
                    _log_interval(run_dir, epoch, step, total_steps, means, optimizer.param_groups[0]["lr"], rate)
                interval_sums, interval_steps, interval_start = {}, 0, time.perf_counter()

        state = TrainingState(epoch=epoch + 1, step=step)
        if ctx.is_main:
            save_checkpoint(checkpoint_path, modules, {"sgd": optimizer}, state, config.resume_key())
            if hooks.on_epoch_end:
                hooks.on_epoch_end(epoch + 1, {k: v / steps_per_ep for k, v in epoch_sums.items()})
        barrier(ctx)
    train_seconds = time.perf_counter() - started
    check_replicas_agree(modules, ctx)

    # 7. Final weights, config and what shaped the run (rank 0) ---------------------------------
    result = FitResult(run_dir=run_dir, epochs=state.epoch, steps=state.step, metrics=None)
    if ctx.is_main:
        weights_meta = {
            "model": config.model,
            "num_classes": str(num_classes),
            "in_channels": str(in_channels),
            "recipe": config.recipe,
            "benchmark": config.benchmark,
        }
        save_weights(student, run_dir / MODEL_FILE, weights_meta)

        # 8. Evaluation (Stage E) into the same run dir -----------------------------------------
        eval_start = time.perf_counter()
        metrics, files = None, {}
        if config.evaluate:
            metrics, files = evaluate_run(student, benchmark, config, ctx.device, run_dir)
        run_info = {
            "benchmark": {
                "name": benchmark.name,
                "class_names": list(benchmark.class_names),
                "mean": list(benchmark.mean),
                "std": list(benchmark.std),
            },
            "model": {
                "name": config.model,
                "parameters": count_parameters(student),
                "feature_dim": feature_dim,
            },
            "train_images": len(train),
            "steps_per_epoch": steps_per_ep,
            "epochs": state.epoch,
            "steps": state.step,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "teacher": _run_ref(teacher),
            "init_from": _run_ref(init_run),
            "outliers": _outlier_info(config, outliers),
            "seconds": {"train": round(train_seconds, 2), "eval": round(time.perf_counter() - eval_start, 2)},
            "torch": torch.__version__,
        }
        (run_dir / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
        result = FitResult(run_dir, state.epoch, state.step, metrics, {**files, "model": run_dir / MODEL_FILE})
    barrier(ctx)
    shutdown(ctx)
    return result


def rank0_first(ctx: DistContext, build: Callable[[bool], Any]) -> Any:
    """build(write=True) on rank 0, then build(write=False) on the others once rank 0's cache file exists."""
    result = build(True) if ctx.is_main else None
    barrier(ctx)
    return result if ctx.is_main else build(False)


def evaluate_run(
    model: nn.Module, benchmark, config: TrainConfig, device: torch.device, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Stage E on the (sliced) benchmark with the run's scorers; writes metrics.json and friends."""
    from oal_trainer.evaluate import evaluate_model, write_eval_outputs

    eval_benchmark = slice_benchmark(benchmark, config.eval_subset, config.seed)
    result = evaluate_model(
        model, eval_benchmark, scorers=config.eval_scorers, batch_size=config.eval_batch_size, device=device
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


def _run_ref(run: LoadedRun | None) -> dict[str, str] | None:
    if run is None:
        return None
    return {"run_dir": str(run.run_dir), "model": run.model_name, "weights_sha256": run.weights_sha256}


def _outlier_info(config: TrainConfig, outliers: OutlierSource | None) -> dict[str, Any] | None:
    if outliers is None:
        return None
    from oal_shared.errors import ManifestError
    from oal_shared.shards import read_manifest

    try:
        manifest_spec = read_manifest(Path(config.shards)).get("spec")  # type: ignore[arg-type]
    except ManifestError as exc:
        logger.warning("Outlier manifest not readable (%s); recording none", exc)
        manifest_spec = None
    stats = outliers.stats
    return {
        "shards": config.shards,
        "source": config.outlier_source,
        "space": config.outlier_space,
        "latent_shape": list(outliers.latent_shape),
        "embed_dim": outliers.embed_dim,
        "samples_read": stats.samples,
        "batches": stats.batches,
        "skipped": stats.skipped,
        "restarts": stats.restarts,
        "errors": stats.errors[:20],
        "job_spec": manifest_spec,
    }
