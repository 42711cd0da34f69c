"""Build the tiny models of the generator tests once per test session.

Each builder is cached by its folder, and the folder comes from pytest's session base temp, so
every test module that asks gets the same files and the build runs once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from oal_shared.settings import Settings
from oal_synth.generators.tiny_random import build_tiny_random_pipeline
from oal_synth.pretrain import PretrainConfig, pretrain_embedded_generator

TEST_THREADS = 2  # the CI machine has 2 cores shared with other jobs


def limit_threads() -> None:
    torch.set_num_threads(TEST_THREADS)


@functools.cache
def tiny_sd_folder(base: Path) -> Path:
    """The tiny random Stable Diffusion pipeline, saved under `base` (built on first call)."""
    limit_threads()
    return build_tiny_random_pipeline(Path(base) / "tiny-sd" / "tiny-random")


@functools.cache
def smoke_generator_folder(base: Path) -> Path:
    """The embedded generator pretrained with the "smoke" preset (seconds), under `base`."""
    limit_threads()
    return pretrain_embedded_generator(
        Path(base) / "smoke-ldm" / "fmnist-ldm", Settings(), PretrainConfig.preset("smoke"), progress=False
    )
