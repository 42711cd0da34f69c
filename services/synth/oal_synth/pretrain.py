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

The config lives in `pretrain_config.py`, the model builders and trainers in `pretrain_models.py`;
this module runs them in order and writes the folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from oal_shared.data.benchmark import load_benchmark
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
from oal_synth.pretrain_config import PRESETS, PretrainConfig, parse_overrides, with_overrides
from oal_synth.pretrain_models import (
    LATENT_CHANNELS,
    PADDED_SIZE,
    StageResult,
    build_unet,
    build_vae,
    encode_dataset,
    pad_to_vae,
    reconstruction_error,
    train_condition_encoder,
    train_unet,
    train_vae,
)

# The config and the trainers are re-exported: `oal_synth.pretrain` stays the one import for callers.
__all__ = [
    "BENCHMARK",
    "LATENT_CHANNELS",
    "PADDED_SIZE",
    "PRESETS",
    "PretrainConfig",
    "StageResult",
    "build_unet",
    "build_vae",
    "encode_dataset",
    "pad_to_vae",
    "parse_overrides",
    "pretrain_embedded_generator",
    "reconstruction_error",
    "save_generator_folder",
    "train_condition_encoder",
    "train_unet",
    "train_vae",
    "with_overrides",
]

logger = logging.getLogger(__name__)

BENCHMARK = "fmnist-osr"


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


# Saving ------------------------------------------------------------------------------------------


def save_generator_folder(
    folder: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, encoder: ConditionEncoder
) -> None:
    """The diffusers folder (no text encoder, tokenizer or safety checker) plus the condition encoder."""
    stage_c.save_pipeline(folder, vae=vae, unet=unet)
    encoder.save_pretrained(folder / ENCODER_SUBFOLDER)
