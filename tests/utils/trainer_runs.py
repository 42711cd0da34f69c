"""Builders for trainer tests: tiny configs, shard folders, a tiny VAE folder, finished runs.

Everything is sized for seconds on 2 CPU cores: the `resnet_tiny` model, a few hundred ID images,
small evaluation slices, latents (4, 8, 8) with 64-dim embeddings (the embedded generator's shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oal_shared.generator_hash import content_hash
from oal_trainer.recipes import TrainConfig, resolve_config
from tests.utils.shards import write_outlier_shards

LATENT_SHAPE = (4, 8, 8)
EMBED_DIM = 64

# Small enough for seconds, large enough that every evaluation set has both classes of scores.
TINY_RUN = {
    "model": "resnet_tiny",
    "train_subset": 128,
    "eval_subset": 48,
    "batch_size": 32,
    "epochs": 1,
    "log_interval": 2,
    "threads": 1,
    "eval_batch_size": 256,
    "shuffle_buffer": 16,
}


def tiny_config(recipe: str, **overrides: Any) -> TrainConfig:
    """A recipe's config at test size; `overrides` win (e.g. teacher_run=..., shards=...)."""
    values = {**TINY_RUN, **overrides}
    return resolve_config(recipe, overrides=[f"{k}={_as_text(v)}" for k, v in values.items()])


def _as_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def write_test_shards(
    out_dir: Path, num_shards: int = 2, per_shard: int = 24, seed: int = 0, generator_dir: Path | None = None
) -> Path:
    """A finished job folder of real shards (shared writer) with the embedded generator's shapes.

    With `generator_dir` (e.g. from `write_tiny_vae`), the manifest names that folder's content
    hash, so a pixel decoder accepts the folder; otherwise it names TEST_GENERATOR.
    """
    generator = None
    if generator_dir is not None:
        generator = {"id": "test-vae", "content_hash": content_hash(generator_dir)}
    write_outlier_shards(
        out_dir,
        num_shards=num_shards,
        per_shard=per_shard,
        latent_shape=LATENT_SHAPE,
        dim=EMBED_DIM,
        seed=seed,
        generator=generator,
    )
    return out_dir


def write_tiny_vae(generator_dir: Path, image_channels: int = 1) -> Path:
    """A random-weight diffusers AutoencoderKL (image_channels x 32 x 32 <-> 4 x 8 x 8) in generator_dir/vae."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_SHAPE[0],
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(str(generator_dir / "vae"))
    return generator_dir
