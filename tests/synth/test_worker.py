"""The worker's failure stories: a killed worker's job is retried and resumes; hopeless jobs fail at once."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import tarfile

import pytest
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from oal_shared.settings import get_settings
from oal_shared.shards import list_shards, read_manifest
from oal_synth import cli
from oal_synth.queue import enqueue_synthesis, fetch_job, job_view, synthesis_queue
from oal_synth.spec import JobSpec
from oal_synth.store import EmbeddingSetStore
from oal_synth.worker import ABANDON_AFTER_BEATS
from tests.utils.live_server import (
    embedding_set_bytes,
    install_tiny_random,
    run_burst_worker,
    wait_until,
    worker_process,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def tiny(oal_env, tmp_path_factory):
    info = install_tiny_random(oal_env.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")
    return info


def make_spec(set_id: str, num_outliers: int, shard_size: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "generator": "tiny-random",
            "embeddings": {"set_id": set_id},
            "num_outliers": num_outliers,
            "seed": 5,
            "sampler": {"k": 5, "select": 4, "n_candidates": 16, "keep": 2},
            "diffusion": {"steps": 4, "batch_size": 2, "guidance_scale": 2.0},
            "shards": {"max_samples": shard_size},
        }
    )


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_worker_job_is_retried_and_resumed(oal_env, redis_conn, tmp_path, tmp_path_factory):
    with worker_process("--heartbeat", "1", log_path=tmp_path / "worker.log") as worker:
        # Set up while the worker starts (its imports take seconds).
        tiny = install_tiny_random(oal_env.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")
        data = embedding_set_bytes(tiny.space, tiny.embed_dim)
        set_id = EmbeddingSetStore.from_settings(oal_env).put_bytes(data)["id"]
        queue = synthesis_queue(redis_conn, oal_env)
        job = enqueue_synthesis(queue, make_spec(set_id, num_outliers=80, shard_size=10), oal_env)

        def view() -> dict:
            return job_view(fetch_job(redis_conn, job.id))

        wait_until(lambda: len(view()["shards"]) >= 2, timeout=60, what="two shards from the first worker")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)

    out_dir = oal_env.shard_root / job.id
    written = {path.name: sha256_of(path) for path in list_shards(out_dir)}
    assert view()["status"] == "started"  # nobody told Redis: the job is abandoned, not failed
    assert 2 <= len(written) < 8
    registry = StartedJobRegistry(queue=queue)
    # The dead worker's entry expires ABANDON_AFTER_BEATS heartbeats after its last one.
    wait_until(
        lambda: job.id in registry.get_expired_job_ids(),
        timeout=ABANDON_AFTER_BEATS + 5,
        what="the abandoned job's registry entry to expire",
    )

    assert run_burst_worker(oal_env)  # its start-up maintenance retries the job, then runs it

    finished = view()
    assert finished["status"] == "finished", finished["error"]
    assert finished["retries_left"] == oal_env.job_retries - 1
    manifest = read_manifest(out_dir)
    assert manifest["num_samples"] == 80 and len(manifest["shards"]) == 8
    keys = []
    for path in list_shards(out_dir):
        with tarfile.open(path) as tar:
            keys += sorted({name.split(".", 1)[0] for name in tar.getnames()})
    assert len(keys) == 80 and len(set(keys)) == 80
    assert {name: sha256_of(out_dir / name) for name in written} == written
    summary = Job.fetch(job.id, connection=redis_conn, serializer=JSONSerializer).return_value()
    assert summary["resumed_shards"] == len(written)


def test_space_mismatch_fails_at_once_without_retries(oal_env, redis_conn, tiny):
    # Enqueued directly, past the API's own check: the worker must refuse it too.
    foreign = EmbeddingSetStore.from_settings(oal_env).put_bytes(embedding_set_bytes("other/space-v9", tiny.embed_dim))
    queue = synthesis_queue(redis_conn, oal_env)
    job = enqueue_synthesis(queue, make_spec(foreign["id"], num_outliers=6, shard_size=6), oal_env)

    run_burst_worker(oal_env)

    view = job_view(fetch_job(redis_conn, job.id))
    assert view["status"] == "failed"
    assert view["retries_left"] == 0
    assert view["error"]["code"] == "SpaceMismatchError"
    assert "other/space-v9" in view["error"]["message"] and tiny.space in view["error"]["message"]
    assert not list_shards(oal_env.shard_root / job.id)


def test_worker_gives_up_when_redis_never_answers(oal_env, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("OAL_REDIS_URL", f"redis://127.0.0.1:{closed_port}/0")
    get_settings.cache_clear()

    result = CliRunner().invoke(cli.app, ["worker", "--burst", "--redis-wait", "1.5"])

    assert result.exit_code == 1
    assert "did not answer within 2 s" in result.stderr


def test_benchmark_job_embeds_id_train_images_with_the_generator(oal_env):
    import numpy as np
    import torch

    from oal_shared.shards import iter_outlier_samples
    from oal_synth.pretrain import PretrainConfig, pretrain_embedded_generator
    from oal_synth.synthesis import run_synthesis_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain_embedded_generator(oal_env.generator_root / "fmnist-ldm", oal_env, PretrainConfig.preset("smoke"))
        spec = {
            "generator": "fmnist-ldm",
            "embeddings": {"benchmark": "fmnist-osr", "per_class": 20},
            "num_outliers": 12,
            "seed": 2,
            "sampler": {"k": 5, "select": 4, "n_candidates": 16, "keep": 2},
            "diffusion": {"steps": 2, "batch_size": 5},
            "shards": {"max_samples": 6, "latent_dtype": "float32"},
        }
        first = run_synthesis_job(spec, job_id="bench-a")  # run directly, outside RQ
        second = run_synthesis_job(spec, job_id="bench-b")
    finally:
        torch.set_num_threads(threads)

    manifest = read_manifest(first["output_dir"])
    assert manifest["embeddings"]["count"] == 6 * 20  # per_class images of each of the 6 ID classes
    assert manifest["embeddings"]["space"] == manifest["generator"]["space"]
    assert manifest["generator"]["kind"] == "embedded" and manifest["num_samples"] == 12
    samples_a = list(iter_outlier_samples(list_shards(first["output_dir"])))
    samples_b = list(iter_outlier_samples(list_shards(second["output_dir"])))
    assert [s.meta["seed"] for s in samples_a] == [s.meta["seed"] for s in samples_b]
    # Same spec, same seed: the same latents, whatever the job id (only keys and provenance differ).
    for a, b in zip(samples_a, samples_b, strict=True):
        np.testing.assert_array_equal(a.latent, b.latent)
        assert a.embedding.shape == (manifest["generator"]["embed_dim"],)
