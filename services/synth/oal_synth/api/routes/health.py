"""Liveness, readiness and metrics: always open, never behind the API token."""

from __future__ import annotations

import logging

import redis.exceptions
from fastapi import APIRouter, Response
from rq import Queue

from oal_synth.api.deps import MetricsDep, QueueDep, RedisDep
from oal_synth.api.metrics import CONTENT_TYPE
from oal_synth.api.schemas import ErrorOut

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process is up (does not touch Redis)")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"model": ErrorOut, "description": "Redis does not answer"}},
    summary="Ready to take jobs: Redis answers",
)
def readyz(connection: RedisDep) -> dict:
    connection.ping()  # a ConnectionError becomes 503 with Retry-After (see api/errors.py)
    return {"status": "ready", "redis": "ok"}


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)")
def metrics(queue: QueueDep, metrics: MetricsDep) -> Response:
    return Response(metrics.render(_queue_depths(queue)), media_type=CONTENT_TYPE)


def _queue_depths(queue: Queue) -> dict[str, int] | None:
    # cleanup=False: a scrape only reads; registry maintenance is the workers' job.
    try:
        return {
            "queued": queue.count,
            "started": queue.started_job_registry.get_job_count(cleanup=False),
            "scheduled": queue.scheduled_job_registry.get_job_count(cleanup=False),
            "failed": queue.failed_job_registry.get_job_count(cleanup=False),
            "finished": queue.finished_job_registry.get_job_count(cleanup=False),
        }
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        logger.warning("metrics without queue depths, Redis did not answer: %s", exc)
        return None
