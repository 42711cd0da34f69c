"""The embedded benchmark generator ("fmnist-ldm"): a small latent diffusion model that runs on a CPU.

Same loading and sampling code as Stable Diffusion (`StableDiffusionPipeline.from_pretrained`, with
no text encoder or tokenizer); the difference is the conditioning. An outlier embedding v (D=64,
a point of the condition encoder's space) is the whole context: `prompt_embeds` = v as one token,
(B, 1, D), and the unconditional branch of classifier-free guidance is the zero vector, which the
UNet saw for the dropped conditions during training.

Images: 28x28 grey, padded to 32x32 for the VAE (1x32x32 -> 4x8x8); `decode_latents` crops back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from oal_shared.errors import ConfigError
from oal_synth.devices import resolve_device, resolve_dtype
from oal_synth.generators import diffusion as stage_c
from oal_synth.generators.base import GeneratorInfo
from oal_synth.generators.condition_encoder import ENCODER_SUBFOLDER, ConditionEncoder
from oal_synth.generators.files import read_generator_info
from oal_synth.spec import DiffusionConfig

logger = logging.getLogger(__name__)

EMBEDDED_KIND = "embedded"


def load_conditionless_pipeline(folder: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The diffusers folder as a StableDiffusionPipeline without text encoder and tokenizer."""
    return stage_c.load_pipeline(str(folder), dtype, text_encoder=None, tokenizer=None)


class EmbeddedGenerator:
    """Latent diffusion conditioned directly on condition-encoder embeddings."""

    def __init__(self, pipeline: StableDiffusionPipeline, encoder: ConditionEncoder, info: GeneratorInfo):
        if pipeline.unet.config.cross_attention_dim != info.embed_dim:
            raise ConfigError(
                f"generator {info.id!r}: UNet cross-attention dim {pipeline.unet.config.cross_attention_dim} "
                f"differs from embed_dim {info.embed_dim} in its oal_generator.json"
            )
        self.pipeline = pipeline
        self.encoder = encoder
        self.info = info
        self._schedulers: dict[str, object] = {}

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> EmbeddedGenerator:
        """Load a folder written by `pretrain_embedded_generator` (diffusers pipeline + encoder + info)."""
        folder = Path(folder)
        torch_device = device if isinstance(device, torch.device) else resolve_device(device)
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or "auto", torch_device)
        info = read_generator_info(folder)
        pipeline = load_conditionless_pipeline(folder, torch_dtype).to(torch_device)
        # The encoder stays float32: it embeds a few thousand small images once per job.
        encoder = ConditionEncoder.from_pretrained(folder / ENCODER_SUBFOLDER).to(torch_device)
        logger.info("loaded embedded generator %s on %s (%s)", info.id, torch_device, torch_dtype)
        return cls(pipeline, encoder, info)

    @property
    def image_size(self) -> int:
        """Side of the images the encoder takes and `decode_latents` returns (28 for Fashion-MNIST)."""
        return self.encoder.config.image_size

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, 28, 28) -> unit embeddings (N, D) float32 on the CPU."""
        return self.encoder.embed(images)

    def generate_latents(
        self,
        embeddings: torch.Tensor,
        class_ids: list[int],
        seeds: list[int],
        diffusion: DiffusionConfig,
        class_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Unscaled z0 (B, 4, 8, 8); the embedding alone conditions, so class ids/names are unused."""
        stage_c.check_batch(embeddings, class_ids, seeds, self.info.embed_dim)
        if embeddings.shape[0] == 0:
            return torch.zeros((0, *self.info.latent_shape))
        prompt_embeds = embeddings.float()[:, None, :]  # (B, 1, D): one context token
        negative = torch.zeros_like(prompt_embeds)  # the condition-dropout token of training
        return stage_c.denoise(self.pipeline, prompt_embeds, negative, seeds, diffusion, self._schedulers)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in [0, 1], (B, 1, 28, 28): the VAE's 32x32 output, centre-cropped."""
        images = stage_c.decode(self.pipeline, latents)  # (B, 1, 32, 32)
        pad = (images.shape[-1] - self.image_size) // 2
        return images[..., pad : pad + self.image_size, pad : pad + self.image_size]
