"""Outlier latents to images with the VAE of the generator that made them, checked against the manifest.

Shards store unscaled z0, in the VAE's own latent space (docs/METHOD.md, Contracts), so
`vae.decode(z)` takes them as they are. The folder must be the job's generator: its content hash
is recomputed and compared with the one the manifest records, since another generator's VAE would
decode the latents into images unrelated to the outliers the job synthesised. diffusers is
imported directly, as the trainer's decoder does, and only when a decoder is built.

Images come out as the VAE makes them: its channels and size, values in [0, 1] (float) or uint8.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from oal_shared.errors import ConfigError
from oal_shared.generator_hash import content_hash
from oal_shared.shards import OutlierManifest

logger = logging.getLogger(__name__)


def check_generator(generator_dir: Path, manifest: OutlierManifest) -> str:
    """The content hash of `generator_dir` if it made the manifest's outliers, else ConfigError naming both."""
    actual = content_hash(Path(generator_dir))
    expected = manifest.generator
    if actual != expected.content_hash:
        raise ConfigError(
            f"generator_dir: {generator_dir} has content hash {actual}, but the outliers in {manifest.folder} "
            f"were made by generator {expected.id!r} with content hash {expected.content_hash}; "
            "decode them with that generator's folder"
        )
    return actual


class LatentImageDecoder:
    """z0 (B, C, h, w) -> images (B, C_img, H, W) in [0, 1] through `generator_dir/vae` (diffusers AutoencoderKL)."""

    def __init__(self, generator_dir: Path, manifest: OutlierManifest, *, device: str | torch.device = "cpu"):
        self.generator_dir = Path(generator_dir)
        vae_dir = self.generator_dir / "vae"
        if not (vae_dir / "config.json").is_file():
            raise ConfigError(f"generator_dir: {vae_dir} holds no diffusers AutoencoderKL (vae/config.json missing)")
        self.content_hash = check_generator(self.generator_dir, manifest)
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(
                str(vae_dir), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"generator_dir: cannot load the VAE from {vae_dir} ({exc})") from exc
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.latent_channels = int(self.vae.config.latent_channels)
        if manifest.layout.latent_shape[0] != self.latent_channels:
            raise ConfigError(
                f"generator_dir: the VAE takes {self.latent_channels} latent channels, the shards in "
                f"{manifest.folder} hold latents of shape {manifest.layout.latent_shape}"
            )
        logger.info("Decoding outliers of %s with the VAE of %s", manifest.folder, vae_dir)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> float32 (B, C_img, H, W) in [0, 1], on the CPU."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ConfigError(
                f"latents of shape {tuple(latents.shape)} do not fit the VAE ({self.latent_channels} latent channels)"
            )
        images = self.vae.decode(latents.to(self.device, self.vae.dtype), return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0.0, 1.0).cpu()


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Float (B, C, H, W) in [0, 1] -> uint8 (B, H, W, C), rounded: what PNG files hold."""
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
