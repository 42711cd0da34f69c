"""Redis stops under a running API and worker, then comes back: nothing needs a restart.

A private `redis-server` (never the shared one) carries the queue. While it is down the API stays
alive (/healthz 200) and answers every queue call 503 with Retry-After and a JSON message; once it
is back on the same port, the same API process and the same worker process take and finish a job.
"""

from __future__ import annotations

import time

import pytest

from oal_synth.api.app import create_app
from tests.reliability.conftest import prepare_tiny_service, reset_settings, tiny_job_spec, wait_for_job_end
from tests.utils.live_server import LiveServer, wait_until, worker_process

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: How long Redis stays away: long enough for the worker to fail a few reconnects.
OUTAGE_S = 2.0
#: A tiny-random job takes about a second; the worker's reconnect back-off adds a few more.
JOB_TIMEOUT_S = 60.0


def assert_unavailable(response, redis_port: int) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert error["code"] == "queue_unavailable"
    assert f"127.0.0.1:{redis_port}" in error["message"] and "Redis" in error["message"]


def test_api_and_worker_ride_out_a_redis_outage(oal_env, private_redis, monkeypatch, tmp_path, tmp_path_factory):
    monkeypatch.setenv("OAL_REDIS_URL", private_redis.url)
    settings = reset_settings()
    worker_log = tmp_path / "worker.log"

    with worker_process("--heartbeat", "1", log_path=worker_log) as worker:
        # Set up while the worker imports torch and diffusers.
        service = prepare_tiny_service(settings, tmp_path_factory.getbasetemp() / "tiny-random-cache")
        spec = tiny_job_spec(service.set_id)
        with LiveServer(create_app(settings)) as server, server.client() as client:
            before = client.post("/v1/jobs", json=spec)
            assert before.status_code == 202, before.text
            first = wait_for_job_end(client, before.json()["id"], JOB_TIMEOUT_S)
            assert first["status"] == "finished", (first["error"], worker_log.read_text())

            private_redis.stop()
            outage_started = time.perf_counter()

            assert client.get("/healthz").status_code == 200
            assert_unavailable(client.get("/readyz"), private_redis.port)
            assert_unavailable(client.post("/v1/jobs", json=spec), private_redis.port)
            assert_unavailable(client.get(f"/v1/jobs/{first['id']}"), private_redis.port)
            assert_unavailable(client.get(f"/v1/jobs/{first['id']}/manifest"), private_redis.port)
            assert_unavailable(client.delete(f"/v1/jobs/{first['id']}"), private_redis.port)
            assert "oal_redis_up 0" in client.get("/metrics").text
            time.sleep(max(0.0, OUTAGE_S - (time.perf_counter() - outage_started)))
            assert worker.poll() is None, f"the worker died with Redis; log: {worker_log.read_text()}"

            private_redis.start()  # same port, empty: `--save ""` kept nothing

            wait_until(lambda: client.get("/readyz").status_code == 200, timeout=10, what="/readyz after restart")
            after = client.post("/v1/jobs", json=tiny_job_spec(service.set_id, seed=2))
            assert after.status_code == 202, after.text
            job = wait_for_job_end(client, after.json()["id"], JOB_TIMEOUT_S)
            assert client.get(f"/v1/jobs/{first['id']}").status_code == 404  # Redis restarted empty

        assert job["status"] == "finished", (job["error"], worker_log.read_text())
        assert job["progress"] == {"done": spec["num_outliers"], "total": spec["num_outliers"]}
        assert (settings.shard_root / job["id"] / "manifest.json").is_file()
        assert worker.poll() is None  # the same worker process, never restarted
