"""A synthesis job on the GPU through the real worker (RQ, Redis, shards), against the same job on the CPU.

Skipped without CUDA (tests/conftest.py); benchmarks/gpu_check.sh runs it on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from oal_shared.settings import get_settings
from oal_shared.shards import iter_outlier_samples, list_shards, read_manifest
from oal_synth.queue import enqueue_synthesis, fetch_job, job_view, synthesis_queue
from oal_synth.spec import JobSpec
from oal_synth.store import EmbeddingSetStore
from tests.utils.live_server import embedding_set_bytes, install_tiny_random, run_burst_worker

pytestmark = [pytest.mark.cuda, pytest.mark.redis]


def run_job_on(device: str, monkeypatch, redis_conn, set_id: str) -> list:
    monkeypatch.setenv("OAL_DEVICE", device)
    get_settings.cache_clear()
    settings = get_settings()
    spec = JobSpec.model_validate(
        {
            "generator": "tiny-random",
            "embeddings": {"set_id": set_id},
            "num_outliers": 12,
            "seed": 3,
            "sampler": {"k": 5, "select": 4, "n_candidates": 16, "keep": 2},
            # dtype auto: float16 on CUDA, float32 on the CPU; latents stored as float32 to compare them
            "diffusion": {"steps": 4, "batch_size": 4, "guidance_scale": 2.0},
            "shards": {"max_samples": 6, "latent_dtype": "float32"},
        }
    )
    job = enqueue_synthesis(synthesis_queue(redis_conn, settings), spec, settings)
    assert run_burst_worker(settings)
    view = job_view(fetch_job(redis_conn, job.id))
    assert view["status"] == "finished", view["error"]
    out_dir = settings.shard_root / job.id
    assert read_manifest(out_dir)["num_samples"] == 12
    return list(iter_outlier_samples(list_shards(out_dir)))


def test_a_job_on_cuda_in_fp16_matches_the_cpu_job(oal_env, redis_conn, tmp_path_factory, monkeypatch):
    tiny = install_tiny_random(oal_env.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")
    set_id = EmbeddingSetStore.from_settings(oal_env).put_bytes(embedding_set_bytes(tiny.space, tiny.embed_dim))["id"]

    on_gpu = run_job_on("cuda", monkeypatch, redis_conn, set_id)
    on_cpu = run_job_on("cpu", monkeypatch, redis_conn, set_id)

    assert [s.meta["seed"] for s in on_gpu] == [s.meta["seed"] for s in on_cpu]
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert np.isfinite(gpu.latent).all()
        # The sampler drew the same boundary points (float32 k-NN on both) ...
        np.testing.assert_allclose(gpu.embedding, cpu.embedding, rtol=1e-3, atol=1e-3)
        # ... and fp16 denoising lands near the fp32 latents (a few steps of a tiny random UNet).
        cosine = float(
            np.dot(gpu.latent.ravel(), cpu.latent.ravel()) / (np.linalg.norm(gpu.latent) * np.linalg.norm(cpu.latent))
        )
        assert cosine > 0.99, (gpu.key, cosine)
