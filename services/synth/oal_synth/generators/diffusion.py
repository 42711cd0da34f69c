"""Stage C, shared by every generator: run a diffusers StableDiffusionPipeline to denoised latents.

Both the Stable Diffusion generator and the embedded benchmark generator are plain diffusers
folders loaded by `StableDiffusionPipeline.from_pretrained`; they differ only in how an outlier
embedding becomes `prompt_embeds`. This module runs the rest, in the pipeline's own steps:
scheduler by name, one seeded CPU generator per sample for the initial noise, classifier-free
guidance with explicit `negative_prompt_embeds`, and `output_type="latent"`.

diffusers returns the denoised latent in the diffusion model's space, i.e. the VAE latent times
`vae.config.scaling_factor` (its own decode divides by that factor first). Our contract stores
unscaled VAE latents, so `denoise` divides by the factor once, here.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from oal_shared.errors import ConfigError
from oal_synth.spec import SCHEDULERS, DiffusionConfig

logger = logging.getLogger(__name__)


def low_cpu_mem_usage() -> bool:
    """diffusers' memory-saving load needs accelerate (the `gpu` extra); ask for it only when present,
    which also keeps diffusers from warning on every load without it."""
    return importlib.util.find_spec("accelerate") is not None


# SD v1's training noise schedule. The folders we build ourselves (embedded, tiny-random) train and
# sample with it, so the saved DDIM scheduler matches training.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def save_pipeline(folder: Path, *, vae, unet, text_encoder=None, tokenizer=None) -> StableDiffusionPipeline:
    """Write a diffusers folder that `load_pipeline` reads back: SD v1's schedule as DDIM with the
    sample clipping SD never used on latents switched off, no safety checker, safetensors only."""
    scheduler = DDIMScheduler(**SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def load_pipeline(
    path_or_hub_id: str, dtype: torch.dtype, *, local_files_only: bool = True, **components
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from a diffusers folder: safetensors only (never unpickle a .bin
    checkpoint), no safety checker. `components` overrides parts, e.g. `text_encoder=None`."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(path_or_hub_id),
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=local_files_only,
        use_safetensors=True,
        low_cpu_mem_usage=low_cpu_mem_usage(),
        **components,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_scheduler(name: str, base_config: dict):
    """A scheduler by algorithm name, built `from_config` of the pipeline's own scheduler.

    "ddim": DDIM without sample clipping (latents are not bounded to [-1, 1]); "pndm": PLMS, the
    pseudo linear multistep variant SD v1 shipped with (Runge-Kutta warm-up skipped);
    "dpm-solver": DPM-Solver++ multistep.
    """
    if name == "ddim":
        return DDIMScheduler.from_config(base_config, clip_sample=False)
    if name == "pndm":
        return PNDMScheduler.from_config(base_config, skip_prk_steps=True)
    if name == "dpm-solver":
        return DPMSolverMultistepScheduler.from_config(base_config)
    raise ConfigError(f"diffusion.scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def check_batch(embeddings: torch.Tensor, class_ids: list[int], seeds: list[int], embed_dim: int) -> None:
    """Refuse a batch whose parts disagree, naming the argument and both sizes."""
    if embeddings.ndim != 2 or embeddings.shape[1] != embed_dim:
        raise ConfigError(f"embeddings: expected shape (B, {embed_dim}), got {tuple(embeddings.shape)}")
    if len(class_ids) != embeddings.shape[0]:
        raise ConfigError(f"class_ids: {len(class_ids)} entries for {embeddings.shape[0]} embeddings")
    if len(seeds) != embeddings.shape[0]:
        raise ConfigError(f"seeds: {len(seeds)} entries for {embeddings.shape[0]} embeddings")
    if any(not isinstance(seed, int) or seed < 0 for seed in seeds):
        raise ConfigError("seeds: every seed must be a non-negative int")
    if not torch.isfinite(embeddings).all():
        raise ConfigError("embeddings: NaN or infinite values")


def image_size(pipeline: DiffusionPipeline, diffusion: DiffusionConfig) -> tuple[int, int]:
    """(height, width) in pixels: the job's, or the UNet's native size; multiples of the VAE factor."""
    factor = pipeline.vae_scale_factor
    native = pipeline.unet.config.sample_size * factor
    height = diffusion.height or native
    width = diffusion.width or native
    for field, value in (("diffusion.height", height), ("diffusion.width", width)):
        if value % factor:
            raise ConfigError(f"{field} must be a multiple of {factor} for this generator, got {value}")
    return height, width


@torch.no_grad()
def denoise(
    pipeline: DiffusionPipeline,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    seeds: list[int],
    diffusion: DiffusionConfig,
    schedulers: dict[str, object],
) -> torch.Tensor:
    """Unscaled z0 for each row of `prompt_embeds` (B, T, H): (B, C, h, w) float32 on the CPU.

    `seeds[i]` seeds a CPU generator that draws sample i's initial noise and nothing else (DDIM
    with eta=0, PLMS and DPM-Solver++ add no noise while stepping), so sample i is the same in any
    batch. `schedulers` caches built schedulers by name on the caller.
    """
    if diffusion.scheduler not in schedulers:
        schedulers[diffusion.scheduler] = build_scheduler(diffusion.scheduler, pipeline.scheduler.config)
    pipeline.scheduler = schedulers[diffusion.scheduler]
    height, width = image_size(pipeline, diffusion)
    scaling_factor = float(pipeline.vae.config.scaling_factor)
    device = pipeline.unet.device
    dtype = pipeline.unet.dtype
    out = []
    for start in range(0, len(seeds), diffusion.batch_size):
        stop = start + diffusion.batch_size
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[start:stop]]
        latents = pipeline(
            prompt_embeds=prompt_embeds[start:stop].to(device, dtype),
            negative_prompt_embeds=negative_prompt_embeds[start:stop].to(device, dtype),
            num_inference_steps=diffusion.steps,
            guidance_scale=diffusion.guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type="latent",
            return_dict=False,
        )[0]  # (b, C, h, w), scaled by the VAE factor
        out.append(latents.float().cpu() / scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode(pipeline: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images in [0, 1], (B, C_img, H, W) float32 on the CPU."""
    vae = pipeline.vae
    images = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    return (images.float().cpu() / 2 + 0.5).clamp_(0.0, 1.0)
