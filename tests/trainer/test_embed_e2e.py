"""An `oal-train embed` set used by a real job: CLI -> file -> POST /v1/embedding-sets -> POST /v1/jobs ->
RQ worker -> shards; and a set made for another SD folder refused, by the API and by the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis
from typer.testing import CliRunner

from oal_shared.embeddings import load_embedding_set
from oal_shared.settings import Settings, get_settings
from oal_shared.shards import list_shards, read_manifest
from oal_synth.api.app import create_app
from oal_synth.generators.base import GeneratorInfo
from oal_synth.queue import enqueue_synthesis, synthesis_queue
from oal_synth.spec import JobSpec
from oal_trainer import cli
from tests.utils.live_server import LiveServer, install_tiny_random, run_burst_worker
from tests.utils.tiny_sd import tiny_model_runtime, tiny_text_side_folder

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EMBED_ARGS = ["--model", "resnet_tiny", "--per-class", "20", "--train-per-class", "100", "--eval-per-class", "50"]
EMBED_ARGS += ["--epochs", "2", "--batch-size", "64", "--no-progress"]


@dataclass
class Service:
    settings: Settings
    client: httpx.Client
    redis: Redis
    info: GeneratorInfo
    root: Path
    base: Path  # pytest's session folder, where tests/utils/tiny_sd.py caches its builds


@pytest.fixture
def service(oal_env, redis_conn, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OAL_JOB_RETRIES", "0")
    get_settings.cache_clear()
    settings = get_settings()
    base = tmp_path_factory.getbasetemp()
    info = install_tiny_random(settings.generator_root, base / "tiny-random-cache")
    with LiveServer(create_app(settings)) as server, server.client() as client:
        yield Service(settings, client, redis_conn, info, tmp_path, base)


def embed(generator: Path, out: Path) -> Path:
    with tiny_model_runtime():
        result = CliRunner().invoke(cli.app, ["embed", "--generator", str(generator), "--out", str(out), *EMBED_ARGS])
    assert result.exit_code == 0, result.output
    return out


def upload(service: Service, path: Path) -> dict:
    response = service.client.post(
        "/v1/embedding-sets", content=path.read_bytes(), headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def job_spec(set_id: str) -> dict:
    return {
        "generator": "tiny-random",
        "embeddings": {"set_id": set_id},
        "num_outliers": 12,
        "seed": 3,
        "sampler": {"k": 5, "select": 4, "n_candidates": 16, "keep": 2},
        "diffusion": {"steps": 3, "batch_size": 4, "guidance_scale": 2.0},
        "shards": {"max_samples": 6},
    }


def test_a_set_made_by_embed_runs_a_job_to_the_end_over_rest(service):
    path = embed(service.settings.generator_root / "tiny-random", service.root / "set.safetensors")
    uploaded = upload(service, path)
    assert uploaded["space"] == service.info.space and uploaded["dim"] == service.info.embed_dim

    response = service.client.post("/v1/jobs", json=job_spec(uploaded["id"]))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert run_burst_worker(service.settings)

    job = service.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "finished", job["error"]
    assert job["progress"] == {"done": 12, "total": 12}
    manifest = read_manifest(service.settings.shard_root / job_id)
    assert manifest["num_samples"] == 12 and len(list_shards(service.settings.shard_root / job_id)) == 2
    assert manifest["embeddings"]["space"] == service.info.space
    assert manifest["embeddings"]["source"] == load_embedding_set(path).source


def test_a_set_made_for_another_sd_folder_is_refused_naming_both_spaces(service):
    # Same hidden size (32) as tiny-random, other weights: only the space tells them apart.
    other = tiny_text_side_folder(service.base, hidden_size=32, seed=7)
    path = embed(other, service.root / "other.safetensors")
    foreign = upload(service, path)
    assert foreign["space"] != service.info.space and foreign["dim"] == service.info.embed_dim

    response = service.client.post("/v1/jobs", json=job_spec(foreign["id"]))
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("space_mismatch", "embeddings.set_id")
    assert foreign["space"] in error["message"] and service.info.space in error["message"]

    # Past the API, straight onto the queue: the worker refuses it too, with the same words.
    queue = synthesis_queue(service.redis, service.settings)
    job = enqueue_synthesis(queue, JobSpec.model_validate(job_spec(foreign["id"])), service.settings)
    run_burst_worker(service.settings)
    view = service.client.get(f"/v1/jobs/{job.id}").json()
    assert view["status"] == "failed"
    assert view["error"]["code"] == "SpaceMismatchError"
    assert foreign["space"] in view["error"]["message"] and service.info.space in view["error"]["message"]
    assert not list_shards(service.settings.shard_root / job.id)
