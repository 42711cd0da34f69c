"""Health, readiness, metrics, OpenAPI, a Redis outage, and the API process staying free of torch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from oal_shared.settings import get_settings
from oal_synth import cli
from oal_synth.api.app import create_app
from tests.utils.live_server import LiveServer, wait_until, write_described_generator

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(oal_env, redis_conn):
    write_described_generator(oal_env.generator_root, "test-gen", "embedded", "test/space-v1", 8)
    with LiveServer(create_app(oal_env)) as server:
        yield server


def test_health_ready_and_openapi(server):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "redis": "ok"}
        paths = client.get("/openapi.json").json()["paths"]
        docs = client.get("/docs")
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/manifest",
        "/v1/generators",
        "/v1/embedding-sets",
        "/v1/embedding-sets/{set_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths
    upload = paths["/v1/embedding-sets"]["post"]["requestBody"]["content"]
    assert set(upload) == {"application/octet-stream", "multipart/form-data"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_generators_lists_described_folders_and_tiny_random(server):
    with server.client() as client:
        generators = {g["id"]: g for g in client.get("/v1/generators").json()["generators"]}
    assert generators["test-gen"]["space"] == "test/space-v1"
    assert generators["test-gen"]["embed_dim"] == 8
    assert "tiny-random" in generators  # listed before its first build


def scrape(client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_requests_by_route_and_jobs(server):
    spec = {"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": 6}
    with server.client() as client:
        client.get("/v1/jobs/" + "0" * 32)
        client.get("/v1/jobs/" + "1" * 32)
        client.get("/no/such/path/" + "2" * 32)
        assert client.post("/v1/jobs", json=spec).status_code == 202
        samples = scrape(client)

    by_route = (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404"))
    assert samples[("oal_http_requests_total", by_route)] == 2
    assert samples[("oal_http_requests_total", (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")))] == 1
    assert samples[("oal_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert not any("0" * 32 in str(labels) for _, labels in samples)  # route templates, never raw paths
    latency = (("method", "GET"), ("route", "/v1/jobs/{job_id}"))
    assert samples[("oal_http_request_duration_seconds_count", latency)] == 2
    assert samples[("oal_http_request_duration_seconds_bucket", (("le", "+Inf"), *latency))] == 2
    assert 0 < samples[("oal_http_request_duration_seconds_sum", latency)] < 10
    assert samples[("oal_jobs_submitted_total", ())] == 1
    assert samples[("oal_queue_jobs", (("state", "queued"),))] == 1
    assert samples[("oal_queue_jobs", (("state", "failed"),))] == 0
    assert samples[("oal_redis_up", ())] == 1


def test_each_app_counts_in_its_own_registry(oal_env, redis_conn):
    write_described_generator(oal_env.generator_root, "test-gen", "embedded", "test/space-v1", 8)
    spec = {"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": 6}
    with LiveServer(create_app(oal_env)) as first, LiveServer(create_app(oal_env)) as second:
        with first.client() as client:
            assert client.post("/v1/jobs", json=spec).status_code == 202
            first_samples = scrape(client)
        with second.client() as client:
            second_samples = scrape(client)

    assert first_samples[("oal_jobs_submitted_total", ())] == 1
    assert second_samples[("oal_jobs_submitted_total", ())] == 0
    # Queue depths come from Redis, which both apps share.
    assert second_samples[("oal_queue_jobs", (("state", "queued"),))] == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_away_is_503_with_retry_after_and_recovers(oal_env, monkeypatch, tmp_path):
    port = _free_port()  # nothing listens here until we start a Redis below
    monkeypatch.setenv("OAL_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    get_settings.cache_clear()
    settings = get_settings()
    write_described_generator(settings.generator_root, "test-gen", "embedded", "test/space-v1", 8)
    spec = {"generator": "test-gen", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": 6}

    with LiveServer(create_app(settings)) as server, server.client() as client:
        submitted = client.post("/v1/jobs", json=spec)
        assert submitted.status_code == 503
        assert int(submitted.headers["retry-after"]) > 0
        assert f"127.0.0.1:{port}" in submitted.json()["error"]["message"]
        assert "Redis" in submitted.json()["error"]["message"]
        assert client.get("/v1/jobs/" + "0" * 32).status_code == 503
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        assert "oal_redis_up 0" in client.get("/metrics").text

        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        try:
            wait_until(lambda: client.get("/readyz").status_code == 200, timeout=10, what="readyz after Redis start")
            assert client.post("/v1/jobs", json=spec).status_code == 202
        finally:
            redis.terminate()
            redis.wait(timeout=10)


TORCH_FREE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from oal_shared.settings import get_settings
    from oal_synth.api.app import create_app
    from tests.utils.live_server import LiveServer, embedding_set_bytes, write_described_generator

    settings = get_settings()
    write_described_generator(settings.generator_root, "test-gen", "embedded", "test/space-v1", 8)
    with LiveServer(create_app(settings)) as server, server.client() as client:
        uploaded = client.post("/v1/embedding-sets", content=embedding_set_bytes("test/space-v1", 8),
                               headers={"content-type": "application/octet-stream"}).json()
        spec = {"generator": "test-gen", "embeddings": {"set_id": uploaded["id"]}, "num_outliers": 6}
        job = client.post("/v1/jobs", json=spec).json()
        statuses = [client.get(f"/v1/jobs/{job['id']}").status_code, client.get("/v1/generators").status_code]
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "diffusers",
                                                                   "transformers", "webdataset"})
    print(json.dumps({"statuses": statuses, "job": job.get("status"), "heavy": heavy}))
    """
)


def test_api_process_never_imports_torch(oal_env, redis_conn):
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["job"] == "queued" and report["statuses"] == [200, 200]
    assert report["heavy"] == []


def test_cli_exits_1_when_the_api_is_unreachable(oal_env):
    url = f"http://127.0.0.1:{_free_port()}"
    runner = CliRunner()

    status = runner.invoke(cli.app, ["status", "0" * 32, "--url", url])
    submitted = runner.invoke(cli.app, ["submit", "--generator", "tiny-random", "--num-outliers", "6", "--url", url])

    for result in (status, submitted):
        assert result.exit_code == 1
        assert "cannot reach the API" in result.stderr
