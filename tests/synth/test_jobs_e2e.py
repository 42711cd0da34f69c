"""Jobs end to end: HTTP -> API -> Redis -> `oal-synth worker` subprocess -> shards on disk.

One worker process serves the whole module (it keeps tiny-random loaded between jobs, as in
production), so these tests share a module-scoped environment and never flush Redis mid-module.
The last test stops that worker with SIGTERM.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import webdataset as wds
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from oal_shared.settings import Settings, get_settings
from oal_shared.shards import list_shards, read_manifest
from oal_synth import cli
from oal_synth.api.app import create_app
from oal_synth.generators.base import GeneratorInfo
from oal_synth.queue import enqueue_synthesis, synthesis_queue
from oal_synth.spec import JobSpec
from oal_synth.store import EmbeddingSetStore
from tests.conftest import TEST_REDIS_URL
from tests.utils.live_server import (
    ID_CLASS_NAMES,
    LiveServer,
    embedding_set_bytes,
    install_tiny_random,
    run_burst_worker,
    wait_until,
    worker_process,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

TERMINAL = {"finished", "failed", "canceled", "stopped"}


@dataclass
class Service:
    settings: Settings
    client: httpx.Client
    redis: Redis
    info: GeneratorInfo
    set_id: str
    worker: subprocess.Popen
    worker_log: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = {
        "OAL_REDIS_URL": TEST_REDIS_URL,
        "OAL_SHARD_ROOT": str(root / "shards"),
        "OAL_ARTIFACT_DIR": str(root / "artifacts"),
        "OAL_GENERATOR_ROOT": str(root / "generators"),
        "OAL_QUEUE_NAME": "oal-test",
        "OAL_TORCH_THREADS": "1",
    }
    redis = Redis.from_url(TEST_REDIS_URL)
    redis.flushdb()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("OAL_API_TOKEN", raising=False)
        get_settings.cache_clear()
        settings = get_settings()
        log = root / "worker.log"
        # The worker starts first: its imports overlap with building tiny-random here.
        with worker_process("--heartbeat", "1", log_path=log) as worker:
            info = install_tiny_random(settings.generator_root, tmp_path_factory.getbasetemp() / "tiny-random-cache")
            data = embedding_set_bytes(info.space, info.embed_dim, per_class=10)
            set_id = EmbeddingSetStore.from_settings(settings).put_bytes(data)["id"]
            with LiveServer(create_app(settings)) as server, server.client() as client:
                yield Service(settings, client, redis, info, set_id, worker, log)
    get_settings.cache_clear()
    redis.flushdb()
    redis.close()


def spec_for(service: Service, num_outliers: int, shard_size: int, batch: int = 2, steps: int = 4) -> dict:
    return {
        "generator": "tiny-random",
        "embeddings": {"set_id": service.set_id},
        "num_outliers": num_outliers,
        "seed": 11,
        "sampler": {"k": 5, "select": 4, "n_candidates": 16, "keep": 2},
        "diffusion": {"steps": steps, "batch_size": batch, "guidance_scale": 2.0},
        "shards": {"max_samples": shard_size},
    }


def submit(service: Service, spec: dict) -> dict:
    response = service.client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def get_job(service: Service, job_id: str) -> dict:
    return service.client.get(f"/v1/jobs/{job_id}").json()


def wait_for_end(service: Service, job_id: str, timeout: float = 60) -> dict:
    job = wait_until(
        lambda: (j := get_job(service, job_id))["status"] in TERMINAL and j,
        timeout,
        what=f"job {job_id} to end (worker log: {service.worker_log})",
    )
    return job


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submit_progress_finished_and_shards_read_back(service):
    job = submit(service, spec_for(service, num_outliers=40, shard_size=15))
    seen = []
    while job["status"] not in TERMINAL:
        time.sleep(0.02)
        job = get_job(service, job["id"])
        seen.append((job["status"], job["progress"]["done"]))
        assert len(seen) < 3000, f"job never ended; worker log: {service.worker_log}"

    assert job["status"] == "finished", job["error"]
    assert job["progress"] == {"done": 40, "total": 40}
    assert any(status == "started" and 0 < done < 40 for status, done in seen), seen
    out_dir = service.settings.shard_root / job["id"]
    assert job["output_dir"] == str(out_dir)
    assert job["manifest_path"] == str(out_dir / "manifest.json")

    manifest = service.client.get(f"/v1/jobs/{job['id']}/manifest").json()
    assert manifest == read_manifest(out_dir)
    assert [s["count"] for s in manifest["shards"]] == [15, 15, 10]
    assert manifest["num_samples"] == 40
    assert manifest["shards"] == job["shards"]
    assert manifest["generator"]["content_hash"] == service.info.content_hash
    assert manifest["spec"]["num_outliers"] == 40
    for entry in manifest["shards"]:
        path = out_dir / entry["name"]
        assert (path.stat().st_size, sha256_of(path)) == (entry["bytes"], entry["sha256"])
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 4 * entry["count"]  # latent.npy, emb.npy, cls, json per sample

    samples = list(wds.WebDataset([str(p) for p in list_shards(out_dir)], shardshuffle=False))
    keys = [sample["__key__"] for sample in samples]
    assert len(samples) == 40 and len(set(keys)) == 40
    assert all("." not in key for key in keys)
    classes = [int(sample["cls"]) for sample in samples]
    assert np.bincount(classes).tolist() == [7, 7, 7, 7, 6, 6]  # 40 spread over 6 classes
    for sample in samples:
        latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
        embedding = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
        provenance = json.loads(sample["json"])
        assert latent.shape == tuple(service.info.latent_shape) and latent.dtype == np.float16
        assert np.isfinite(latent).all()
        assert embedding.shape == (service.info.embed_dim,) and embedding.dtype == np.float32
        assert provenance["job_id"] == job["id"]
        assert provenance["generator"] == {
            "id": "tiny-random",
            "kind": "tiny-random",
            "content_hash": service.info.content_hash,
        }
        assert provenance["space"] == service.info.space
        assert provenance["class"] == int(sample["cls"])
        assert provenance["class_name"] == ID_CLASS_NAMES[provenance["class"]]
        assert (provenance["scheduler"], provenance["steps"], provenance["guidance_scale"]) == ("ddim", 4, 2.0)
        assert provenance["scaling_factor"] == service.info.scaling_factor
        assert provenance["schema_version"] == 1
    assert len({json.loads(s["json"])["seed"] for s in samples}) == 40


def test_cancel_running_and_queued_jobs(service):
    running = submit(service, spec_for(service, num_outliers=400, shard_size=20))
    wait_until(
        lambda: (j := get_job(service, running["id"]))["status"] == "started" and j["shards"],
        timeout=60,
        what="the long job to write its first shard",
    )
    queued = submit(service, spec_for(service, num_outliers=6, shard_size=6))
    assert queued["status"] == "queued"

    canceled = service.client.delete(f"/v1/jobs/{queued['id']}")
    asked = service.client.delete(f"/v1/jobs/{running['id']}")

    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    assert asked.status_code == 202
    stopped = wait_for_end(service, running["id"])
    assert stopped["status"] == "stopped"
    assert stopped["error"]["code"] == "stopped"
    assert 20 <= stopped["progress"]["done"] < 400
    out_dir = service.settings.shard_root / running["id"]
    assert list_shards(out_dir) and not (out_dir / "manifest.json").exists()  # finished shards are kept
    # The canceled job never ran, even though the worker was free right after.
    submit_after = submit(service, spec_for(service, num_outliers=6, shard_size=6))
    assert wait_for_end(service, submit_after["id"])["status"] == "finished"
    assert get_job(service, queued["id"])["status"] == "canceled"
    assert not (service.settings.shard_root / queued["id"]).exists()


def test_rerun_after_losing_a_shard_rewrites_identical_bytes(service):
    spec = spec_for(service, num_outliers=24, shard_size=8, batch=3)
    first = wait_for_end(service, submit(service, spec)["id"])
    assert first["status"] == "finished"
    assert service.client.delete(f"/v1/jobs/{first['id']}").status_code == 409  # nothing left to cancel
    out_dir = service.settings.shard_root / first["id"]
    before = {path.name: sha256_of(path) for path in list_shards(out_dir)}
    (out_dir / "outliers-000001.tar").unlink()
    (out_dir / "manifest.json").unlink()

    # The same job again (same id): it must keep shards 0 and 2 and rebuild 1 byte for byte.
    queue = synthesis_queue(service.redis, service.settings)
    enqueue_synthesis(queue, JobSpec.model_validate(spec), service.settings, job_id=first["id"])
    again = wait_for_end(service, first["id"])

    assert again["status"] == "finished"
    assert {path.name: sha256_of(path) for path in list_shards(out_dir)} == before
    assert [s["sha256"] for s in read_manifest(out_dir)["shards"]] == list(before.values())
    summary = Job.fetch(first["id"], connection=service.redis, serializer=JSONSerializer).return_value()
    assert summary["resumed_shards"] == 2 and summary["num_samples"] == 24


def test_cli_submit_follows_the_job_and_prints_the_manifest_path(service, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec_for(service, num_outliers=12, shard_size=6)))
    url = str(service.client.base_url)

    submitted = CliRunner().invoke(cli.app, ["submit", str(spec_file), "--seed", "4", "--url", url, "--poll", "0.1"])

    assert submitted.exit_code == 0, submitted.output
    manifest = read_manifest(Path(submitted.stdout.strip().splitlines()[-1]))
    assert manifest["num_samples"] == 12 and manifest["spec"]["seed"] == 4  # the flag overrode the file
    shown = CliRunner().invoke(cli.app, ["status", manifest["job_id"], "--url", url])
    assert shown.exit_code == 0 and "finished" in shown.stdout and "12/12 outliers" in shown.stdout


def test_sigterm_requeues_the_running_job_which_resumes_on_another_worker(service):
    """Must run last in this module: it stops the module's worker."""
    job = submit(service, spec_for(service, num_outliers=60, shard_size=10))
    wait_until(
        lambda: (j := get_job(service, job["id"]))["status"] == "started" and j["shards"],
        timeout=60,
        what="the job to write its first shard",
    )

    service.worker.send_signal(signal.SIGTERM)

    assert service.worker.wait(timeout=30) == 0
    requeued = get_job(service, job["id"])
    assert requeued["status"] == "queued"
    assert requeued["retries_left"] == service.settings.job_retries  # a stop is not a failure
    out_dir = service.settings.shard_root / job["id"]
    written = {path.name: sha256_of(path) for path in list_shards(out_dir)}
    assert 1 <= len(written) < 6

    assert run_burst_worker(service.settings)

    finished = get_job(service, job["id"])
    assert finished["status"] == "finished" and finished["progress"] == {"done": 60, "total": 60}
    assert read_manifest(out_dir)["num_samples"] == 60
    assert {name: sha256_of(out_dir / name) for name in written} == written  # kept, not rewritten
    summary = Job.fetch(job["id"], connection=service.redis, serializer=JSONSerializer).return_value()
    assert summary["resumed_shards"] == len(written)
