"""The three models of the embedded generator, built and trained: condition encoder, VAE, UNet.

Each trainer takes its data as tensors and the `PretrainConfig`, and returns the model in eval
mode with a `StageResult` (loss per step, seconds). All three share one loop (`_fit`: AdamW,
warm-up + cosine) fed by seeded index batches (`_batches`). `pretrain.py` runs them in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from oal_shared.errors import ConfigError
from oal_shared.schedules import warmup_cosine
from oal_synth.generators import diffusion as stage_c
from oal_synth.generators.condition_encoder import ConditionEncoder, ConditionEncoderConfig
from oal_synth.pretrain_config import PretrainConfig

__all__ = [
    "LATENT_CHANNELS",
    "PADDED_SIZE",
    "StageResult",
    "build_unet",
    "build_vae",
    "encode_dataset",
    "pad_to_vae",
    "reconstruction_error",
    "train_condition_encoder",
    "train_unet",
    "train_vae",
]

# Stage lines log under the run's name, so one logger name follows a whole pretraining run.
logger = logging.getLogger("oal_synth.pretrain")

PADDED_SIZE = 32  # 28x28 images are zero-padded to 32x32, a size the 3-level VAE halves cleanly
LATENT_CHANNELS = 4


@dataclass
class StageResult:
    losses: list[float]
    seconds: float


# Data and the training loop ----------------------------------------------------------------------


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
