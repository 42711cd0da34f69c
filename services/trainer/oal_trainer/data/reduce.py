"""f_ood: the reduction of a latent batch to one vector per outlier (docs/METHOD.md, Stage D)."""

from __future__ import annotations

import torch

from oal_shared.errors import ConfigError


def reduce_latents(latents: torch.Tensor, mode: str) -> torch.Tensor:
    """f_ood, (B, C, H, W) -> (B, F): flatten (F = CHW) or mean_ch_h (mean over C and H, F = W)."""
    if mode == "flatten":
        return latents.flatten(1)
    if mode == "mean_ch_h":
        # The reference reduces SD's 4x64x64 latents to 64 numbers this way.
        return latents.mean(dim=(1, 2))
    raise ConfigError(f"latent_reduce must be flatten or mean_ch_h, got {mode!r}")


def reduced_latent_dim(latent_shape: tuple[int, int, int], mode: str) -> int:
    c, h, w = latent_shape
    return c * h * w if mode == "flatten" else w
