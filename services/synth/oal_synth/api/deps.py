"""Dependencies every route takes: settings, Redis, the queue, the embedding-set store, auth.

All live on `app.state`, made once by `create_app`, so a test app gets its own settings and
connections and a route never reads globals.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue

from oal_shared.settings import Settings
from oal_synth.api.errors import APIError
from oal_synth.api.metrics import ApiMetrics
from oal_synth.store import EmbeddingSetStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_store(request: Request) -> EmbeddingSetStore:
    return request.app.state.store


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StoreDep = Annotated[EmbeddingSetStore, Depends(get_store)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


def require_token(request: Request, settings: SettingsDep) -> None:
    """When OAL_API_TOKEN is set, the request must carry `Authorization: Bearer <token>`.

    The comparison takes the same time whatever the token, so it leaks nothing about it.
    """
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise APIError(
            401,
            "unauthorized",
            "this endpoint needs the header 'Authorization: Bearer <token>' with the server's OAL_API_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Depends(require_token)
