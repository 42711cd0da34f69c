"""200 job submissions at once over loopback HTTP: every one answered, no accepted job lost.

The admission limit (OAL_MAX_QUEUED_JOBS) is set below the burst, so the run exercises both
answers a client may get under load: 202 with the job, or 429 with Retry-After. No worker runs,
so every accepted job must still be queued afterwards and readable by GET.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from oal_synth.api.app import create_app
from oal_synth.queue import synthesis_queue
from oal_synth.store import EmbeddingSetStore
from tests.reliability.conftest import reset_settings
from tests.utils.live_server import LiveServer, embedding_set_bytes, write_described_generator

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SPACE = "test/space-v1"
DIM = 8
CONCURRENT_SUBMISSIONS = 200
QUEUE_LIMIT = 150


async def submit_all(url: str, spec: dict, count: int) -> list[tuple[httpx.Response, float]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def timed_submit() -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = await client.post("/v1/jobs", json=spec)
            return response, time.perf_counter() - started

        return await asyncio.gather(*(timed_submit() for _ in range(count)))


def test_200_concurrent_submissions_are_all_answered_and_none_is_lost(oal_env, redis_conn, monkeypatch):
    monkeypatch.setenv("OAL_MAX_QUEUED_JOBS", str(QUEUE_LIMIT))
    settings = reset_settings()
    write_described_generator(settings.generator_root, "test-gen", "embedded", SPACE, DIM)
    set_id = EmbeddingSetStore.from_settings(settings).put_bytes(embedding_set_bytes(SPACE, DIM))["id"]
    spec = {"generator": "test-gen", "embeddings": {"set_id": set_id}, "num_outliers": 6}

    with LiveServer(create_app(settings)) as server:
        started = time.perf_counter()
        answers = asyncio.run(submit_all(server.url, spec, CONCURRENT_SUBMISSIONS))
        wall = time.perf_counter() - started
        accepted = [r.json()["id"] for r, _ in answers if r.status_code == 202]
        with server.client() as client:
            read_back = {job_id: client.get(f"/v1/jobs/{job_id}") for job_id in accepted}

    latencies_ms = np.array([seconds for _, seconds in answers]) * 1000
    statuses = sorted({r.status_code for r, _ in answers})
    refused = [r for r, _ in answers if r.status_code in (429, 503)]
    print(
        f"\n{CONCURRENT_SUBMISSIONS} concurrent submissions in {wall:.2f} s: {len(accepted)} accepted (202), "
        f"{len(refused)} refused (429/503); submit latency p50 {np.percentile(latencies_ms, 50):.0f} ms, "
        f"p99 {np.percentile(latencies_ms, 99):.0f} ms, max {latencies_ms.max():.0f} ms"
    )

    assert set(statuses) <= {202, 429, 503}, statuses
    assert len(accepted) + len(refused) == CONCURRENT_SUBMISSIONS
    for response in refused:
        assert int(response.headers["retry-after"]) > 0
        assert response.json()["error"]["message"]
    # None lost: every accepted id is readable, still queued, and on the queue exactly once.
    assert len(set(accepted)) == len(accepted)
    for job_id, response in read_back.items():
        assert response.status_code == 200, response.text
        assert (response.json()["id"], response.json()["status"]) == (job_id, "queued")
    queued_ids = synthesis_queue(redis_conn, settings).job_ids
    assert sorted(queued_ids) == sorted(accepted)
    # The limit holds exactly, though up to 40 requests (the API's thread pool) count at the same time.
    assert len(accepted) == QUEUE_LIMIT
