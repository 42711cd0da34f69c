"""Build the tiny models of the generator tests once per test session, and run them cheaply.

Each builder is cached by its folder, and the folder comes from pytest's session base temp, so
every test module that asks gets the same files and the build runs once.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from oal_shared.settings import Settings
from oal_synth.generators.tiny_random import build_tiny_random_pipeline
from oal_synth.pretrain import PretrainConfig, pretrain_embedded_generator

# Measured on the 2-core CI machine while other jobs ran: the generator tests took 26-62 s with
# 2 torch threads (a parallel region waits for a descheduled twin thread) and 11 s with 1.
TEST_THREADS = 1


@contextlib.contextmanager
def tiny_model_runtime():
    """One torch thread and plain ATen kernels instead of oneDNN, restored afterwards.

    At these sizes oneDNN's per-call setup dominates: a tiny UNet step took 0.1 s without it and
    over 1 s with it. Scoped, so other tests keep torch's defaults.
    """
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(TEST_THREADS)
    torch.backends.mkldnn.enabled = False  # (mkldnn.flags() would also touch TF32 and warn)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn


@functools.cache
def tiny_sd_folder(base: Path) -> Path:
    """The tiny random Stable Diffusion pipeline, saved under `base` (built on first call)."""
    with tiny_model_runtime():
        return build_tiny_random_pipeline(Path(base) / "tiny-sd" / "tiny-random")


@functools.cache
def smoke_generator_folder(base: Path) -> Path:
    """The embedded generator pretrained with the "smoke" preset (seconds), under `base`."""
    with tiny_model_runtime():
        return pretrain_embedded_generator(
            Path(base) / "smoke-ldm" / "fmnist-ldm", Settings(), PretrainConfig.preset("smoke"), progress=False
        )


@functools.cache
def tiny_text_side_folder(base: Path, hidden_size: int, seed: int) -> Path:
    """An SD-shaped folder holding only `model_index.json`, tokenizer/ and text_encoder/, under `base`.

    The tokenizer is tiny-random's; the text encoder is a fresh seeded CLIPTextModel of
    `hidden_size`. Enough for `oal-train embed` (which loads nothing else), and another token space
    than tiny-random's: a second hidden size, or the same size with another seed.
    """
    import json
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel

    source = tiny_sd_folder(base)
    folder = Path(base) / "tiny-sd" / f"text-side-{hidden_size}-seed-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source / "tokenizer", folder / "tokenizer")
    config = CLIPTextConfig.from_pretrained(str(source / "text_encoder"))
    config.hidden_size = hidden_size
    config.intermediate_size = 2 * hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPTextModel(config).save_pretrained(str(folder / "text_encoder"))
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    index.update(unet=[None, None], vae=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
