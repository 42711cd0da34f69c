"""Stable Diffusion as an outlier generator: the paper's Stage C (docs/METHOD.md, Stage C).

The conditioning space is the text encoder's token-embedding space (its input embeddings, dim =
hidden size). An outlier embedding v for class c conditions SD like this:

1. prompt "A high-quality image of the <c>", tokenised by the pipeline's tokenizer;
2. the text encoder runs with the token rows of the class word replaced by v, rescaled to the
   norm of the row it replaces (a forward hook on the input-embedding layer does the swap);
3. its last hidden state is `prompt_embeds`, the empty prompt's is `negative_prompt_embeds`;
4. the pipeline denoises to a latent (`diffusion.denoise`), no VAE decode.

A class name of several tokens ("T-shirt/top") has each of its rows replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from oal_shared.errors import ConfigError
from oal_shared.token_space import token_space_id
from oal_synth.devices import resolve_device, resolve_dtype
from oal_synth.generators import diffusion as stage_c
from oal_synth.generators.base import GENERATOR_INFO_FILE, GeneratorInfo
from oal_synth.generators.files import content_hash, read_generator_info, write_generator_info
from oal_synth.spec import DiffusionConfig

logger = logging.getLogger(__name__)

PROMPT_PREFIX = "A high-quality image of the"
SD_KIND = "stable-diffusion"


def prompt_for(class_name: str) -> str:
    return f"{PROMPT_PREFIX} {class_name}"


class StableDiffusionGenerator:
    """A diffusers SD pipeline whose class-word token rows take the outlier embeddings."""

    def __init__(self, pipeline: StableDiffusionPipeline, info: GeneratorInfo):
        if pipeline.text_encoder is None or pipeline.tokenizer is None:
            raise ConfigError(f"generator {info.id!r}: a Stable Diffusion folder needs a text_encoder and tokenizer")
        self.pipeline = pipeline
        self.info = info
        self._schedulers: dict[str, object] = {}
        self._class_tokens: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self._negative: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        local_files_only: bool = True,
        generator_id: str | None = None,
    ) -> StableDiffusionGenerator:
        """Load a diffusers SD folder (or a hub id already in the local cache).

        device: "auto"/None picks CUDA when present; dtype: "auto"/None is float16 on CUDA, float32
        on the CPU. The folder's `oal_generator.json` supplies id and hash when present; without
        it they are computed (a hub id gets no content hash, as its files are not ours to hash).
        """
        torch_device = device if isinstance(device, torch.device) else resolve_device(device)
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or "auto", torch_device)
        pipeline = stage_c.load_pipeline(str(path_or_hub_id), torch_dtype, local_files_only=local_files_only)
        pipeline.to(torch_device)
        folder = Path(path_or_hub_id)
        if (folder / GENERATOR_INFO_FILE).is_file():
            info = read_generator_info(folder)
        else:
            info = describe_pipeline(
                pipeline,
                generator_id=generator_id or folder.name,
                weights_hash=content_hash(folder) if folder.is_dir() else "",
            )
        logger.info("loaded Stable Diffusion generator %s on %s (%s)", info.id, torch_device, torch_dtype)
        return cls(pipeline, info)

    # The conditioning space --------------------------------------------------------------

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self.pipeline.text_encoder.get_input_embeddings()

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        raise ConfigError(
            f"generator {self.info.id!r} cannot embed images: Stable Diffusion's conditioning space is its "
            "token-embedding space; upload an embedding set in that space (space "
            f"{self.info.space!r}) and submit the job with embeddings.set_id"
        )

    def class_token_rows(self, class_name: str) -> tuple[torch.Tensor, list[int]]:
        """Token ids of the padded prompt for `class_name` (T,) and the positions of its class word."""
        if class_name not in self._class_tokens:
            tokenizer = self.pipeline.tokenizer
            max_length = tokenizer.model_max_length
            prefix = tokenizer(PROMPT_PREFIX).input_ids  # [bos, ..., eos]
            full = tokenizer(prompt_for(class_name)).input_ids
            positions = list(range(len(prefix) - 1, len(full) - 1))  # the class word, without eos
            if not positions:
                raise ConfigError(f"class name {class_name!r} gives no tokens with this tokenizer")
            if len(full) > max_length:
                raise ConfigError(
                    f"class name {class_name!r}: the prompt has {len(full)} tokens, the text encoder takes {max_length}"
                )
            ids = tokenizer(
                prompt_for(class_name), padding="max_length", max_length=max_length, return_tensors="pt"
            ).input_ids[0]
            self._class_tokens[class_name] = (ids, positions)
        return self._class_tokens[class_name]

    @torch.no_grad()
    def prompt_embeddings(
        self, embeddings: torch.Tensor, class_ids: list[int], class_names: Sequence[str]
    ) -> torch.Tensor:
        """Text-encoder output for each outlier, class-word rows replaced: (B, T, hidden)."""
        text_encoder = self.pipeline.text_encoder
        device = text_encoder.device
        token_ids, row_mask = [], []
        for class_id in class_ids:
            if not 0 <= class_id < len(class_names):
                raise ConfigError(f"class_ids: {class_id} is not a class index of {len(class_names)} class names")
            ids, positions = self.class_token_rows(class_names[class_id])
            mask = torch.zeros(ids.shape[0], dtype=torch.bool)
            mask[positions] = True
            token_ids.append(ids)
            row_mask.append(mask)
        input_ids = torch.stack(token_ids).to(device)  # (B, T)
        replace = torch.stack(row_mask).to(device)  # (B, T)
        if (embeddings.norm(dim=1) == 0).any():
            raise ConfigError("embeddings: an outlier embedding has zero norm, so it has no direction to use")
        directions = torch.nn.functional.normalize(embeddings.float(), dim=1).to(device)  # (B, D)

        def swap_class_rows(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            # output (B, T, D): token rows. Replace class-word rows by the outlier's direction times
            # the norm of the row it replaces (docs/METHOD.md, Stage C: rescaled to that token embedding's norm).
            norms = output.float().norm(dim=-1, keepdim=True)  # (B, T, 1)
            swapped = directions[:, None, :] * norms  # (B, T, D)
            return torch.where(replace[..., None], swapped.to(output.dtype), output)

        handle = self.token_embedding.register_forward_hook(swap_class_rows)
        try:
            hidden = text_encoder(input_ids, return_dict=False)[0]  # (B, T, hidden)
        finally:
            handle.remove()
        return hidden

    @torch.no_grad()
    def negative_embedding(self) -> torch.Tensor:
        """The empty prompt's text-encoder output, (1, T, hidden): the unconditional branch of CFG."""
        if self._negative is None:
            tokenizer = self.pipeline.tokenizer
            ids = tokenizer(
                "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
            ).input_ids.to(self.pipeline.text_encoder.device)
            self._negative = self.pipeline.text_encoder(ids, return_dict=False)[0]
        return self._negative

    # Stage C -------------------------------------------------------------------------------

    def generate_latents(
        self,
        embeddings: torch.Tensor,
        class_ids: list[int],
        seeds: list[int],
        diffusion: DiffusionConfig,
        class_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        stage_c.check_batch(embeddings, class_ids, seeds, self.info.embed_dim)
        names = tuple(class_names) if class_names is not None else self.info.class_names
        if not names:
            raise ConfigError(f"generator {self.info.id!r}: class_names are needed to build the prompts")
        if embeddings.shape[0] == 0:
            return torch.zeros((0, *self.info.latent_shape))
        prompt_embeds = self.prompt_embeddings(embeddings, class_ids, names)
        negative = self.negative_embedding().expand_as(prompt_embeds)
        return stage_c.denoise(self.pipeline, prompt_embeds, negative, seeds, diffusion, self._schedulers)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return stage_c.decode(self.pipeline, latents)


def describe_pipeline(
    pipeline: StableDiffusionPipeline,
    generator_id: str,
    weights_hash: str,
    kind: str = SD_KIND,
    class_names: Sequence[str] = (),
    description: str = "",
) -> GeneratorInfo:
    """The GeneratorInfo of an SD pipeline: token space, hidden size, native latent shape."""
    token_matrix = pipeline.text_encoder.get_input_embeddings().weight  # (V, hidden)
    size = pipeline.unet.config.sample_size
    return GeneratorInfo(
        id=generator_id,
        kind=kind,
        space=token_space_id(token_matrix),
        embed_dim=int(token_matrix.shape[1]),
        latent_shape=(int(pipeline.unet.config.in_channels), int(size), int(size)),
        scaling_factor=float(pipeline.vae.config.scaling_factor),
        content_hash=weights_hash,
        class_names=tuple(class_names),
        description=description or "Stable Diffusion; outlier embeddings replace the class word's token rows",
    )


def register_stable_diffusion(folder: Path, generator_id: str, class_names: Sequence[str] = ()) -> GeneratorInfo:
    """Describe an SD diffusers folder (e.g. a downloaded SD v1.4) in its `oal_generator.json`, so
    `GET /v1/generators` lists it; loads it once on the CPU to read the token space. Returns the info."""
    folder = Path(folder)
    generator = StableDiffusionGenerator.from_pretrained(
        folder, device="cpu", dtype="float32", generator_id=generator_id
    )
    info = describe_pipeline(
        generator.pipeline, generator_id=generator_id, weights_hash=content_hash(folder), class_names=class_names
    )
    write_generator_info(folder, info)
    return info
