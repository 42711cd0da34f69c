"""What every generator offers the worker: a conditioning space and a latent sampler.

A generator turns outlier embeddings (points in its conditioning space) into denoised latents z0,
taken before any VAE decode. Its `info` is plain data, readable without torch (the API lists
generators from the `oal_generator.json` beside the diffusers folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

# The file name is shared with the trainer, which hashes generator folders without importing oal_synth.
from oal_shared.generator_hash import GENERATOR_INFO_FILE as GENERATOR_INFO_FILE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from oal_synth.spec import DiffusionConfig


@dataclass(frozen=True)
class GeneratorInfo:
    """Plain facts about a generator, recorded in every shard's provenance."""

    id: str  # e.g. "fmnist-ldm", "tiny-random", "sd-v1-4"
    kind: str  # "embedded" | "stable-diffusion" | "tiny-random"
    space: str  # conditioning-space id; embedding sets must carry the same
    embed_dim: int  # D of one conditioning embedding
    latent_shape: tuple[int, int, int]  # (C, H, W) of z0 at the default size
    scaling_factor: float  # VAE scaling factor; latents in shards are unscaled
    content_hash: str  # sha256 over the weight files, so provenance pins exact weights
    class_names: tuple[str, ...] = ()  # classes the generator knows words for (SD prompt), if any
    description: str = ""

    @property
    def can_embed_images(self) -> bool:
        """Only the embedded kind owns an image encoder; Stable Diffusion-style generators are
        conditioned on token embeddings, which clients upload as embedding sets."""
        return self.kind == "embedded"

    def to_json(self) -> dict:
        data = asdict(self)
        data["latent_shape"] = list(self.latent_shape)
        data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_json(cls, data: dict, source: str = "generator info") -> GeneratorInfo:
        """Inverse of `to_json`; a missing or mistyped field raises ConfigError naming it and `source`."""
        from oal_shared.errors import ConfigError

        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        required = ("id", "kind", "space", "embed_dim", "latent_shape", "scaling_factor", "content_hash")
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"{source}: field {missing[0]!r} is missing")
        try:
            latent_shape = tuple(int(v) for v in data["latent_shape"])
            if len(latent_shape) != 3:
                raise ValueError(f"needs 3 entries (C, H, W), got {len(latent_shape)}")
            return cls(
                id=str(data["id"]),
                kind=str(data["kind"]),
                space=str(data["space"]),
                embed_dim=int(data["embed_dim"]),
                latent_shape=latent_shape,  # type: ignore[arg-type]
                scaling_factor=float(data["scaling_factor"]),
                content_hash=str(data["content_hash"]),
                class_names=tuple(str(name) for name in data.get("class_names", ())),
                description=str(data.get("description", "")),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed field value ({exc})") from exc


@runtime_checkable
class LatentGenerator(Protocol):
    info: GeneratorInfo

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """Embed ID images (uint8, (N,H,W) or (N,H,W,3)) into the conditioning space, (N, D) float32."""

    def generate_latents(
        self,
        embeddings: torch.Tensor,
        class_ids: list[int],
        seeds: list[int],
        diffusion: DiffusionConfig,
        class_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Denoise one latent per embedding row; returns unscaled z0, (B, C, H, W) float32 on CPU.

        "Unscaled" is diffusers' sense: the VAE's own latent space (what `vae.encode` gives and
        `vae.decode` takes), i.e. the denoised diffusion latent divided by `info.scaling_factor`.
        `seeds[i]` alone decides sample i's initial noise, so a sample never depends on its batch.
        `class_ids[i]` picks the prompt (Stable Diffusion: the class word whose token row the
        embedding replaces) from `class_names` (the job's embedding set), else `info.class_names`.
        """

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents to images in [0, 1], (B, C_img, H, W)."""
