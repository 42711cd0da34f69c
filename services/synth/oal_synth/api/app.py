"""The FastAPI application of the synthesis service: `create_app(settings)`.

This process validates, enqueues and reads job state; it never imports torch or diffusers (a test
checks sys.modules after serving requests). `oal-synth serve` runs it under uvicorn:

    uvicorn --factory oal_synth.api.app:create_app
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from oal_shared import __version__
from oal_shared.settings import Settings, get_settings
from oal_synth.api.errors import install_error_handlers
from oal_synth.api.metrics import ApiMetrics
from oal_synth.api.middleware import BodyLimitMiddleware, RequestContextMiddleware, RequestMetricsMiddleware
from oal_synth.api.routes import embedding_sets, generators, health, jobs
from oal_synth.queue import connect, synthesis_queue
from oal_synth.store import EmbeddingSetStore

logger = logging.getLogger(__name__)

DESCRIPTION = """Latent-space outlier synthesis (OAL). Submit a job naming a generator and ID embeddings
(an uploaded set, or a benchmark the worker embeds); workers sample low-density boundary outliers and
denoise each into a latent, written as WebDataset shards with a manifest.

Errors are JSON `{"error": {"code", "message", "field", "request_id"}}`; every answer carries its
request id in `X-Request-ID` (a sane id the client sent is kept). When `OAL_API_TOKEN` is set, POST and
DELETE need `Authorization: Bearer <token>`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; connections are made lazily, so it starts (and serves /healthz) without Redis."""
    settings = settings or get_settings()
    app = FastAPI(title="OAL synthesis service", version=__version__, description=DESCRIPTION)
    app.state.settings = settings
    app.state.redis = connect(settings)
    app.state.queue = synthesis_queue(app.state.redis, settings)
    app.state.store = EmbeddingSetStore.from_settings(settings)
    app.state.metrics = ApiMetrics(app.state.queue)  # its own registry: apps in one process count apart

    install_error_handlers(app)
    for router in (jobs.router, generators.router, embedding_sets.router, health.router):
        app.include_router(router)
    # Added last = outermost: requests are counted even when the body limit refuses them, and every
    # answer (a 413 from the body limit, a 500 from anything unhandled) carries the request id.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestContextMiddleware)
    logger.info("API ready: queue %s, Redis %s", settings.queue_name, _redacted(settings.redis_url))
    return app


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url
