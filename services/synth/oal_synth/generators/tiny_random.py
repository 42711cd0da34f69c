"""A tiny Stable Diffusion pipeline with random weights, for tests and for trying the service offline.

Every part is a real diffusers/transformers class (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDIMScheduler), only small and seeded; its outputs mean nothing.
The tokenizer is built here from a vocabulary learned over the prompt words and the Fashion-MNIST
class names, so every class word is one token or a few, and nothing is downloaded.

Importing this module costs no torch: the heavy imports sit in `build_tiny_random_pipeline`.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from oal_shared.data.fashion_mnist import FMNIST_CLASSES
from oal_synth.generators.base import GeneratorInfo
from oal_synth.generators.files import content_hash, replace_dir, write_generator_info

logger = logging.getLogger(__name__)

TINY_RANDOM_ID = "tiny-random"
TINY_RANDOM_KIND = "tiny-random"
TINY_RANDOM_DESCRIPTION = (
    "Tiny Stable Diffusion pipeline with RANDOM weights (seeded): exercises the full SD code path "
    "offline in seconds; its latents carry no meaning."
)
TINY_HIDDEN = 32  # text hidden size = token-embedding dim = cross-attention dim
TINY_LATENT_SHAPE = (4, 8, 8)
TINY_MAX_TOKENS = 24
TINY_SEED = 0
PROMPT_WORDS = "A high-quality image of the"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _pre_tokens(text: str) -> list[str]:
    # CLIP's pre-tokeniser splits letters from everything else and lowercases; mirror it so the
    # vocabulary learned here covers exactly what the tokenizer will see.
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def learn_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-pair merges that build every word of `words` into one token, and the vocabulary.

    Plain BPE learning (merge the most frequent adjacent pair until each word is one symbol), so
    applying the merges by rank reproduces whole words: hand-ordered merges can collide ("h i"
    from "high" would split "shirt").
    """
    segments = {word: tuple(word[:-1]) + (word[-1] + "</w>",) for word in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts = collections.Counter(pair for seg in segments.values() for pair in zip(seg, seg[1:], strict=False))
        if not counts:
            break
        best = max(sorted(counts), key=counts.__getitem__)
        merges.append(best)
        for word, seg in segments.items():
            merged, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    merged.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    merged.append(seg[i])
                    i += 1
            segments[word] = tuple(merged)
    vocab = {BOS: 0, EOS: 1}
    for char in sorted({c for word in segments for c in word}):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def tiny_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    texts = [PROMPT_WORDS, *FMNIST_CLASSES]
    return learn_bpe([token for text in texts for token in _pre_tokens(text)])


def build_tiny_random_pipeline(out_dir: Path) -> Path:
    """Build, seed and save the tiny pipeline plus `oal_generator.json` into `out_dir`; returns it.

    Written to a temporary sibling folder and renamed, so a reader never sees half a pipeline.
    An existing `out_dir` is replaced.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from oal_synth.generators import diffusion as stage_c
    from oal_synth.generators.stable_diffusion import describe_pipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        vocab, merges = tiny_vocabulary()
        vocab_dir = work / "vocab-src"
        vocab_dir.mkdir()
        (vocab_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (vocab_dir / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        tokenizer = CLIPTokenizer(
            vocab=str(vocab_dir / "vocab.json"),
            merges=str(vocab_dir / "merges.txt"),
            model_max_length=TINY_MAX_TOKENS,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(vocab),
                    hidden_size=TINY_HIDDEN,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=TINY_MAX_TOKENS,
                    bos_token_id=vocab[BOS],
                    eos_token_id=vocab[EOS],
                    pad_token_id=vocab[EOS],
                )
            )
            unet = UNet2DConditionModel(
                sample_size=TINY_LATENT_SHAPE[1],
                in_channels=TINY_LATENT_SHAPE[0],
                out_channels=TINY_LATENT_SHAPE[0],
                block_out_channels=(16, 32),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=TINY_HIDDEN,
                attention_head_dim=4,
                norm_num_groups=8,
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(8, 16),
                layers_per_block=1,
                latent_channels=TINY_LATENT_SHAPE[0],
                norm_num_groups=8,
                sample_size=TINY_LATENT_SHAPE[1] * 2,
            )
        model_dir = work / "model"
        pipeline = stage_c.save_pipeline(model_dir, vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer)
        info = describe_pipeline(
            pipeline,
            generator_id=TINY_RANDOM_ID,
            weights_hash=content_hash(model_dir),
            kind=TINY_RANDOM_KIND,
            class_names=FMNIST_CLASSES,
            description=TINY_RANDOM_DESCRIPTION,
        )
        write_generator_info(model_dir, info)
        replace_dir(model_dir, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("built tiny-random pipeline in %s (space %s)", out_dir, info.space)
    return out_dir


def unbuilt_info() -> GeneratorInfo:
    """What `GET /v1/generators` shows before first use: space and hash exist only once it is built."""
    return GeneratorInfo(
        id=TINY_RANDOM_ID,
        kind=TINY_RANDOM_KIND,
        space="",
        embed_dim=TINY_HIDDEN,
        latent_shape=TINY_LATENT_SHAPE,
        scaling_factor=0.18215,
        content_hash="",
        class_names=FMNIST_CLASSES,
        description=TINY_RANDOM_DESCRIPTION + " Not built yet: built on first use.",
    )
