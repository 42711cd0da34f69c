"""The SD v1.x-architecture pipeline (benchmarks/sd_v1_configs, random weights) on CUDA in fp16 and fp32.

Skipped without CUDA (tests/conftest.py); benchmarks/gpu_check.sh runs it on a GPU machine and
benchmarks/bench_sd_scale.py measures the same models.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_sd_scale import build_models, denoise  # noqa: E402

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def sd_models():
    """The three SD v1.x networks with random weights, built once (about 1.1B parameters, on the CPU)."""
    return build_models()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sd_v1_architecture_denoises_and_decodes_on_cuda(sd_models, dtype):
    unet, vae, text_encoder = (copy.deepcopy(m).to("cuda", dtype) for m in sd_models)
    with torch.inference_mode():
        latents, image = denoise(unet, vae, text_encoder, batch=2, steps=3, guidance=7.5, device="cuda", dtype=dtype)
    assert latents.shape == (2, 4, 64, 64) and latents.dtype == dtype
    assert image.shape == (2, 3, 512, 512)
    assert torch.isfinite(latents).all() and torch.isfinite(image).all()
