"""Liveness, readiness and metrics: always open, never behind the API token."""

from __future__ import annotations

from fastapi import APIRouter, Response

from oal_synth.api.deps import MetricsDep, RedisDep
from oal_synth.api.metrics import CONTENT_TYPE
from oal_synth.api.schemas import ErrorOut

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
def metrics(metrics: MetricsDep) -> Response:
    # A sync route: the scrape reads queue depths from Redis, off the event loop.
    return Response(metrics.render(), media_type=CONTENT_TYPE)
