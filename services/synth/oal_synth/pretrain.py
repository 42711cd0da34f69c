"""Pretrain the embedded benchmark generator "fmnist-ldm" on the Fashion-MNIST ID train images.

Three models, trained one after the other on the 36,000 ID train images of `fmnist-osr`:

1. condition encoder: small CNN -> unit vector (D=64), cross-entropy over cos/0.1 to learned class
   anchors (Dream-OOD style, see `condition_encoder.py`): the conditioning space;
2. AutoencoderKL 1x32x32 -> 4x8x8 (images padded 28 -> 32, pixels in [-1, 1]), MSE + a small KL;
   its scaling factor is measured afterwards as 1 / std of the latents, as SD's 0.18215 was;
3. UNet2DConditionModel on the scaled latents (epsilon prediction, SD v1's noise schedule),
   conditioned on each image's embedding as a one-token context; `cond_dropout` of the
   conditions are zeroed, which teaches the unconditional branch of classifier-free guidance.

The result is a diffusers folder that `StableDiffusionPipeline.from_pretrained(...,
text_encoder=None, tokenizer=None, ...)` loads, plus `condition_encoder/`, `oal_generator.json`
and `pretrain_report.json` (losses, accuracy, reconstruction error, timings). Everything is
trained in a temporary sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from oal_shared.data.benchmark import load_benchmark
from oal_shared.errors import ConfigError
from oal_shared.schedules import warmup_cosine
from oal_shared.settings import Settings, get_settings
from oal_synth.generators import diffusion as stage_c
from oal_synth.generators.base import GeneratorInfo
from oal_synth.generators.condition_encoder import (
    ENCODER_SUBFOLDER,
    ConditionEncoder,
    ConditionEncoderConfig,
    encoder_space_hash,
)
from oal_synth.generators.embedded import EMBEDDED_KIND
from oal_synth.generators.files import PRETRAIN_REPORT_FILE, content_hash, replace_dir, write_generator_info
from oal_synth.generators.registry import FMNIST_LDM_ID

logger = logging.getLogger(__name__)

BENCHMARK = "fmnist-osr"
PADDED_SIZE = 32  # 28x28 images are zero-padded to 32x32, a size the 3-level VAE halves cleanly
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class PretrainConfig:
    """Every size, step count and rate of the three trainings. Use `PretrainConfig.preset(name)`."""

    name: str = "custom"  # the preset it came from
    seed: int = 0
    train_images: int | None = 18_000  # cap on ID train images (evenly per class); None: all 36,000
    # 1. condition encoder
    encoder_widths: tuple[int, ...] = (32, 64)
    embed_dim: int = 64
    temperature: float = 0.1
    encoder_steps: int = 150
    encoder_batch: int = 128
    encoder_lr: float = 3e-3
    # 2. VAE
    vae_widths: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 130
    vae_batch: int = 128
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # per latent element, against the per-pixel MSE in [-1, 1] units
    # 3. UNet
    unet_widths: tuple[int, ...] = (32, 64)
    unet_steps: int = 260
    unet_batch: int = 128
    unet_lr: float = 1e-3
    cond_dropout: float = 0.1  # fraction of conditions zeroed: the unconditional token of CFG
    warmup_steps: int = 10  # linear warm-up of every learning rate, then cosine decay
    eval_images: int = 2000  # ID test images for the accuracy and reconstruction report

    @classmethod
    def preset(cls, name: str) -> PretrainConfig:
        if name not in PRESETS:
            raise ConfigError(f"pretrain preset must be one of {', '.join(PRESETS)}, got {name!r}")
        return PRESETS[name]

    def __post_init__(self) -> None:
        for field in ("encoder_steps", "vae_steps", "unet_steps", "encoder_batch", "vae_batch", "unet_batch"):
            if getattr(self, field) < 1:
                raise ConfigError(f"pretrain config {field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"pretrain config cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.train_images is not None and self.train_images < 12:
            raise ConfigError(f"pretrain config train_images must be >= 12 (2 per class), got {self.train_images}")

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


PRESETS: dict[str, PretrainConfig] = {
    # Seconds, for tests: small models, few images, a handful of steps. The output means nothing.
    "smoke": PretrainConfig(
        name="smoke",
        train_images=384,
        encoder_widths=(8, 16),
        encoder_steps=4,
        encoder_batch=64,
        vae_widths=(8, 16, 16),
        vae_steps=3,
        vae_batch=32,
        unet_widths=(16, 32),
        unet_steps=3,
        unet_batch=32,
        warmup_steps=1,
        eval_images=64,
    ),
    # The product default: about 4 minutes on 2 idle cores, sized from the step times in docs/BENCHMARKS.md
    # (VAE 1.0 s and UNet 0.9 s per batch-256 step): encoder ~15 s, VAE ~65 s, UNet ~120 s, and
    # embedding / encoding 18,000 images ~15 s.
    "demo": PretrainConfig(name="demo"),
    # Five times the demo's steps on all 36,000 images: about 20 minutes on 2 idle cores.
    "full": PretrainConfig(
        name="full", train_images=None, encoder_steps=600, vae_steps=650, unet_steps=1300, warmup_steps=50
    ),
}


@dataclass
class StageResult:
    losses: list[float]
    seconds: float


def pretrain_embedded_generator(
    out_dir: str | Path,
    settings: Settings | None = None,
    config: PretrainConfig | None = None,
    progress: bool = False,
    generator_id: str = FMNIST_LDM_ID,
) -> Path:
    """Train the three models and write a loadable generator folder to `out_dir` (replaced if present).

    `progress` shows tqdm bars with the running loss (CLI use). Returns `out_dir`.
    """
    settings = settings if settings is not None else get_settings()
    config = config if config is not None else PretrainConfig.preset("demo")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    benchmark = load_benchmark(BENCHMARK, settings)
    images, labels = _subsample(benchmark.id_train.images, benchmark.id_train.labels, config.train_images, config.seed)
    test_images, test_labels = _subsample(
        benchmark.id_test.images, benchmark.id_test.labels, config.eval_images, config.seed
    )
    mean, std = benchmark.mean[0], benchmark.std[0]
    logger.info("pretraining %s on %d ID train images (preset %s)", generator_id, len(images), config.name)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # 1. Condition encoder: the conditioning space.
        encoder_config = ConditionEncoderConfig(
            image_size=int(images.shape[1]),
            widths=config.encoder_widths,
            embed_dim=config.embed_dim,
            num_classes=benchmark.num_classes,
            temperature=config.temperature,
            pixel_mean=float(mean),
            pixel_std=float(std),
            class_names=tuple(benchmark.class_names),
        )
        encoder, encoder_run = train_condition_encoder(images, labels, encoder_config, config, progress)
        embeddings = encoder.embed(images)  # (N, D), unit rows
        test_embeddings = encoder.embed(test_images)
        encoder_accuracy = float((encoder.logits(test_embeddings).argmax(1).numpy() == test_labels).mean())

        # 2. VAE, then its scaling factor from the latents of the training images.
        pixels = pad_to_vae(images)  # (N, 1, 32, 32) in [-1, 1]
        vae, vae_run = train_vae(pixels, config, progress)
        latent_mean, latent_std = encode_dataset(vae, pixels)  # (N, 4, 8, 8) each
        sample = latent_mean + latent_std * torch.randn_like(latent_mean)
        scaling_factor = float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=scaling_factor)
        reconstruction_mse = reconstruction_error(vae, pad_to_vae(test_images))

        # 3. UNet on scaled latents, conditioned on the embeddings.
        unet, unet_run = train_unet(latent_mean, latent_std, scaling_factor, embeddings, config, progress)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model_dir = work / "model"
        save_generator_folder(model_dir, vae, unet, encoder)
        space = f"{generator_id}/{encoder_space_hash(encoder)}"
        report = {
            "config": config.to_json(),
            "train_images": int(len(images)),
            "eval_images": int(len(test_images)),
            "encoder": {
                "final_loss": encoder_run.losses[-1],
                "seconds": encoder_run.seconds,
                "test_accuracy": encoder_accuracy,
            },
            "vae": {
                "final_loss": vae_run.losses[-1],
                "seconds": vae_run.seconds,
                "test_reconstruction_mse": reconstruction_mse,
                "scaling_factor": scaling_factor,
            },
            "unet": {"final_loss": unet_run.losses[-1], "seconds": unet_run.seconds},
            "losses": {"encoder": encoder_run.losses, "vae": vae_run.losses, "unet": unet_run.losses},
            "total_seconds": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(),
            "space": space,
        }
        (model_dir / PRETRAIN_REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
        info = GeneratorInfo(
            id=generator_id,
            kind=EMBEDDED_KIND,
            space=space,
            embed_dim=config.embed_dim,
            latent_shape=(LATENT_CHANNELS, PADDED_SIZE // 4, PADDED_SIZE // 4),
            scaling_factor=scaling_factor,
            content_hash=content_hash(model_dir),
            class_names=tuple(benchmark.class_names),
            description=(
                f"Latent diffusion on Fashion-MNIST ID classes (preset {config.name}, "
                f"{len(images)} images); conditioned on a 64-d condition-encoder embedding"
            ),
        )
        write_generator_info(model_dir, info)
        replace_dir(model_dir, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "pretrained %s in %.0f s: encoder acc %.3f, VAE test MSE %.4f, scaling factor %.4f",
        generator_id,
        report["total_seconds"],
        encoder_accuracy,
        reconstruction_mse,
        scaling_factor,
    )
    return out_dir


# Data -------------------------------------------------------------------------------------------


def _subsample(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` images, the same number from each class (a fixed seeded choice)."""
    if limit is None or limit >= len(images):
        return images, labels
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(1, limit // len(classes))
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
            for c in classes
        ]
    )
    chosen.sort()
    return images[chosen], labels[chosen]


def pad_to_vae(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1], zero (black) border of 2 pixels."""
    pixels = torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0)[:, None]  # a copy
    pad = (PADDED_SIZE - images.shape[-1]) // 2
    return F.pad(pixels, (pad, pad, pad, pad), value=-1.0)


def _batches(num_items: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` index batches drawn epoch by epoch from a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(num_items, generator=generator), 0
    for _ in range(steps):
        if cursor + batch_size > num_items:
            order, cursor = torch.randperm(num_items, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def _fit(
    name: str,
    parameters,
    lr: float,
    steps: int,
    warmup: int,
    loss_of_step: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[torch.Tensor],
    progress: bool,
) -> StageResult:
    """The one training loop of all three stages: AdamW, warm-up + cosine, tqdm with the loss."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = warmup_cosine(optimizer, steps, warmup)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=name, disable=not progress, leave=True)
    for batch in batches:
        loss = loss_of_step(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    seconds = time.perf_counter() - started
    logger.info("%s: %d steps in %.1f s, final loss %.4f", name, steps, seconds, losses[-1])
    return StageResult(losses=losses, seconds=seconds)


# 1. Condition encoder ----------------------------------------------------------------------------


def train_condition_encoder(
    images: np.ndarray,
    labels: np.ndarray,
    encoder_config: ConditionEncoderConfig,
    config: PretrainConfig,
    progress: bool,
) -> tuple[ConditionEncoder, StageResult]:
    """Cross-entropy over cos(z, a_c) / tau: classes become tight, well separated clusters."""
    encoder = ConditionEncoder(encoder_config).train()
    inputs = encoder.preprocess(images)  # (N, 1, 28, 28)
    targets = torch.from_numpy(labels)

    def loss_of_step(batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(encoder.logits(encoder(inputs[batch])), targets[batch])

    batches = _batches(len(images), min(config.encoder_batch, len(images)), config.encoder_steps, config.seed)
    run = _fit(
        "encoder",
        encoder.parameters(),
        config.encoder_lr,
        config.encoder_steps,
        config.warmup_steps,
        loss_of_step,
        batches,
        progress,
    )
    return encoder.eval(), run


# 2. VAE ------------------------------------------------------------------------------------------


def build_vae(widths: tuple[int, ...]) -> AutoencoderKL:
    levels = len(widths)
    if PADDED_SIZE // 2 ** (levels - 1) != 8:
        raise ConfigError(f"pretrain config vae_widths needs 3 levels (32 -> 8 latents), got {len(widths)}")
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=min(8, min(widths)),
        sample_size=PADDED_SIZE,
    )


def train_vae(pixels: torch.Tensor, config: PretrainConfig, progress: bool) -> tuple[AutoencoderKL, StageResult]:
    """MSE reconstruction + kl_weight * KL(q(z|x) || N(0, I)) per latent element."""
    vae = build_vae(config.vae_widths).train()
    latent_elements = LATENT_CHANNELS * (PADDED_SIZE // 4) ** 2

    def loss_of_step(batch: torch.Tensor) -> torch.Tensor:
        x = pixels[batch]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / latent_elements
        return F.mse_loss(reconstruction, x) + config.kl_weight * kl

    batches = _batches(len(pixels), min(config.vae_batch, len(pixels)), config.vae_steps, config.seed + 1)
    run = _fit(
        "vae", vae.parameters(), config.vae_lr, config.vae_steps, config.warmup_steps, loss_of_step, batches, progress
    )
    return vae.eval(), run


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: (N, 4, 8, 8) each, unscaled."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        posterior = vae.encode(pixels[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Mean squared error of decode(mean latent) in [0, 1] pixel units on the 28x28 image area."""
    latent_mean, _ = encode_dataset(vae, pixels)
    reconstruction = torch.cat([vae.decode(latent_mean[i : i + 1024]).sample for i in range(0, len(pixels), 1024)])
    pad = (PADDED_SIZE - 28) // 2
    inner = (slice(None), slice(None), slice(pad, PADDED_SIZE - pad), slice(pad, PADDED_SIZE - pad))
    return float(F.mse_loss((reconstruction[inner].clamp(-1, 1) + 1) / 2, (pixels[inner] + 1) / 2))


# 3. UNet -----------------------------------------------------------------------------------------


def build_unet(widths: tuple[int, ...], embed_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=PADDED_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        # Cross-attention at 8x8 (and in the mid block); plain ResNet blocks below: the context is one
        # token, so more attention layers add cost (docs/BENCHMARKS.md: 0.8M params, 0.9 s per batch-256 step).
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(widths) - 1),
        up_block_types=("UpBlock2D",) * (len(widths) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=embed_dim,
        attention_head_dim=8,
        norm_num_groups=min(8, min(widths)),
    )


def train_unet(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    embeddings: torch.Tensor,
    config: PretrainConfig,
    progress: bool,
) -> tuple[UNet2DConditionModel, StageResult]:
    """Epsilon prediction on scaling_factor * z, z ~ q(z|x); context = the image's embedding."""
    unet = build_unet(config.unet_widths, config.embed_dim).train()
    noise_scheduler = DDPMScheduler(**stage_c.SD_NOISE_SCHEDULE)
    step_generator = torch.Generator().manual_seed(config.seed + 2)

    def loss_of_step(batch: torch.Tensor) -> torch.Tensor:
        size = len(batch)
        draw = torch.randn(latent_mean[batch].shape, generator=step_generator)
        z0 = scaling_factor * (latent_mean[batch] + latent_std[batch] * draw)  # (b, 4, 8, 8)
        noise = torch.randn(z0.shape, generator=step_generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (size,), generator=step_generator)
        noisy = noise_scheduler.add_noise(z0, noise, timesteps)
        keep = torch.rand(size, generator=step_generator) >= config.cond_dropout  # (b,)
        context = (embeddings[batch] * keep[:, None].float())[:, None, :]  # (b, 1, D), dropped -> 0
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(prediction, noise)

    batches = _batches(len(latent_mean), min(config.unet_batch, len(latent_mean)), config.unet_steps, config.seed + 3)
    run = _fit(
        "unet",
        unet.parameters(),
        config.unet_lr,
        config.unet_steps,
        config.warmup_steps,
        loss_of_step,
        batches,
        progress,
    )
    return unet.eval(), run


# Saving ------------------------------------------------------------------------------------------


def save_generator_folder(
    folder: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, encoder: ConditionEncoder
) -> None:
    """The diffusers folder (no text encoder, tokenizer or safety checker) plus the condition encoder."""
    stage_c.save_pipeline(folder, vae=vae, unet=unet)
    encoder.save_pretrained(folder / ENCODER_SUBFOLDER)


def with_overrides(config: PretrainConfig, **overrides) -> PretrainConfig:
    """A preset with some fields changed (CLI flags), validated again."""
    unknown = sorted(set(overrides) - set(asdict(config)))
    if unknown:
        raise ConfigError(f"unknown pretrain config fields: {unknown}")
    return replace(config, **overrides)
