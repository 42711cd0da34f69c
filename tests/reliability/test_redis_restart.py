"""Redis restarts empty while a job runs: the worker notices and goes on, the API says the job is lost.

A private `redis-server` without persistence carries the queue; stopping and starting it on the
same port wipes every job record while the worker is in the middle of a job. The worker must log
that it lost the job, stop it, register itself again and take the next job (no hang, no crash
loop). The API must answer the lost job's id at once with a 404/410 whose message says the queue
lost it, not a job that looks "started" forever and not a plain "never submitted".
"""

from __future__ import annotations

import time

import pytest

from oal_synth.api.app import create_app
from tests.reliability.conftest import (
    FAST_MAINTENANCE_S,
    FAST_WORKER_OPTIONS,
    WORKER_START_S,
    idle_workers,
    prepare_tiny_service,
    tiny_job_spec,
    wait_for_job_end,
)
from tests.utils.live_server import LiveServer, wait_until, worker_process

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: A tiny-random job takes seconds; the worker may need a few reconnects after the restart.
JOB_TIMEOUT_S = 60.0
#: How soon after the restart the API must call the job lost (the worker notices at its next batch).
LOST_WITHIN_S = 10.0


def long_spec(set_id: str) -> dict:
    spec = tiny_job_spec(set_id, num_outliers=60)
    spec["shards"] = {"max_samples": 6}
    return spec


def lost_answer(client, job_id: str):
    response = client.get(f"/v1/jobs/{job_id}")
    if response.status_code == 410 and "lost by the queue" in response.json()["error"]["message"]:
        return response
    return None


def test_redis_restarted_empty_mid_job_the_worker_goes_on_and_the_api_says_lost(
    private_queue, tmp_path, tmp_path_factory
):
    settings, connection, private_redis = private_queue.settings, private_queue.connection, private_queue.redis
    worker_log = tmp_path / "worker.log"

    with worker_process(*FAST_WORKER_OPTIONS, log_path=worker_log) as worker:
        service = prepare_tiny_service(settings, tmp_path_factory.getbasetemp() / "tiny-random-cache")
        with LiveServer(create_app(settings)) as server, server.client(timeout=5.0) as client:
            submitted = client.post("/v1/jobs", json=long_spec(service.set_id))
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            wait_until(
                lambda: client.get(f"/v1/jobs/{job_id}").json()["shards"], timeout=WORKER_START_S, what="a shard"
            )

            private_redis.stop()
            private_redis.start()  # same port, nothing kept
            restarted_at = time.monotonic()

            lost = wait_until(lambda: lost_answer(client, job_id), timeout=LOST_WITHIN_S, what="the API to say lost")
            lost_after_s = time.monotonic() - restarted_at
            message = lost.json()["error"]["message"]
            assert job_id in message, message

            # The worker noticed, stopped the job and is back in the registry, idle.
            wait_until(lambda: "lost" in worker_log.read_text(), timeout=LOST_WITHIN_S, what="the worker's log line")
            wait_until(
                lambda: idle_workers(connection),
                timeout=FAST_MAINTENANCE_S * 3 + 5,
                what="the worker to register again and be idle",
            )
            # Nothing the worker did afterwards brought back a half record: still lost, still fast.
            again = client.get(f"/v1/jobs/{job_id}")
            assert again.status_code == lost.status_code and "lost by the queue" in again.json()["error"]["message"]
            assert not [key for key in connection.keys("*") if job_id.encode() in key and b"lost" not in key]

            after = client.post("/v1/jobs", json=tiny_job_spec(service.set_id, seed=2))
            assert after.status_code == 202, after.text
            job = wait_for_job_end(client, after.json()["id"], JOB_TIMEOUT_S)

        assert job["status"] == "finished", (job["error"], worker_log.read_text())
        assert worker.poll() is None, "the same worker process, never restarted"
    log = worker_log.read_text()
    assert log.count("quitting") == 0, log
    print(f"API said lost {lost_after_s:.1f} s after the restart: {lost.status_code} {message}")  # noqa: T201
