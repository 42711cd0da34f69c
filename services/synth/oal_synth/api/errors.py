"""Every error leaves the API as JSON `{"error": {"code", "message", "field"?, "request_id"}}`.

The message says what to change; `field` is the dotted path of the request field at fault
(`sampler.k`, `embeddings.set_id`, `generator`); `request_id` is the one in the `X-Request-ID`
header and in the server's log. Handlers map: pydantic validation -> 422 (the same problems the
worker reports, from `oal_synth.validation`), our OALError family -> 4xx, Redis away -> 503 with
Retry-After, Redis refusing our credentials -> 503, any other Redis error -> 500. Anything else
that escapes a route is answered 500 by `RequestContextMiddleware` (api/middleware.py), which
logs the traceback with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from oal_shared.errors import (
    ConfigError,
    DataNotFoundError,
    EmbeddingSetError,
    OALError,
    SpaceMismatchError,
    UnsafePathError,
)
from oal_synth.api.request_id import request_id_of
from oal_synth.queue import JobLostError, JobNotFoundError, JobStateError
from oal_synth.validation import Problem, describe_problems, spec_problems

logger = logging.getLogger(__name__)

#: Seconds a client should wait before retrying when Redis is away or the queue is full.
REDIS_RETRY_AFTER_S = 5
QUEUE_FULL_RETRY_AFTER_S = 30

# Where a validation error's value came from; not part of the request field's path.
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}
# Redis refusing this client rather than failing: a wrong password in OAL_REDIS_URL, or an ACL.
_REDIS_REFUSALS = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,
)


class APIError(Exception):
    """An error answer with its status; raise it from routes and dependencies."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, str]] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers
        self.details = details


def error_body(
    code: str,
    message: str,
    field: str | None = None,
    details: list[dict[str, str]] | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details:
        error["details"] = details
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_response(error: APIError, request: Request | None = None) -> JSONResponse:
    request_id = request_id_of(request) if request is not None else None
    return JSONResponse(
        error_body(error.code, error.message, error.field, error.details, request_id),
        status_code=error.status_code,
        headers=error.headers,
    )


def validation_error(problems: Sequence[Problem]) -> APIError:
    """A 422 in the words the worker would use (`describe_problems`): the first field, every problem in details."""
    problems = list(problems) or [Problem("body", "invalid request")]
    details = [{"field": p.field, "message": p.message} for p in problems]
    return APIError(422, problems[0].code, describe_problems(problems), field=problems[0].field, details=details)


def request_problems(errors: Sequence[Mapping[str, Any]]) -> list[Problem]:
    """FastAPI's validation errors as problems: JSON syntax errors, then the spec's own."""
    problems = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":  # loc is ("body", character position)
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            problems.append(Problem("body", f"not valid JSON ({reason} at character {loc[-1] if loc else '?'})"))
            continue
        if loc and loc[0] in _LOC_SOURCES:
            loc = loc[1:]
        problems += spec_problems([{**error, "loc": loc}])
    return problems


# ---------------------------------------------------------------------------- handlers


def redis_location(redis_url: str) -> str:
    """host:port/db of a Redis URL, never its password."""
    parts = urlsplit(redis_url)
    return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(request_problems(list(exc.errors()))), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return error_response(APIError(exc.status_code, code, message, headers=getattr(exc, "headers", None)), request)

    # Starlette picks the handler of the nearest class in the exception's MRO, so the refusals
    # (AuthenticationError is a ConnectionError) are told apart from an outage.
    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_away(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        where = redis_location(request.app.state.settings.redis_url)
        logger.warning(
            "request %s: Redis at %s unreachable while serving %s %s: %s",
            request_id_of(request),
            where,
            request.method,
            request.url.path,
            exc,
        )
        message = (
            f"the job queue (Redis at {where}) is unreachable; nothing was changed. "
            f"Retry in {REDIS_RETRY_AFTER_S} s; if it persists, check that Redis is running"
        )
        headers = {"Retry-After": str(REDIS_RETRY_AFTER_S)}
        return error_response(APIError(503, "queue_unavailable", message, headers=headers), request)

    for refusal in _REDIS_REFUSALS:
        app.add_exception_handler(refusal, _redis_refused)
    app.add_exception_handler(redis.exceptions.RedisError, _redis_failed)

    @app.exception_handler(OALError)
    async def _oal_error(request: Request, exc: OALError) -> JSONResponse:
        return error_response(oal_error_to_api(exc), request)


async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
    where = redis_location(request.app.state.settings.redis_url)
    logger.error("request %s: Redis at %s refused the API's credentials: %s", request_id_of(request), where, exc)
    message = (
        f"the job queue (Redis at {where}) refused this service's credentials ({type(exc).__name__}); "
        "nothing was changed. The operator must fix the password or ACL in OAL_REDIS_URL"
    )
    return error_response(APIError(503, "queue_refused", message), request)


async def _redis_failed(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request)
    where = redis_location(request.app.state.settings.redis_url)
    logger.error(
        "request %s: Redis at %s answered %s %s with an error",
        request_id,
        where,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    message = (
        f"the job queue (Redis at {where}) answered with an error ({type(exc).__name__}); "
        f"the server log has the details under request id {request_id}"
    )
    return error_response(APIError(500, "queue_error", message), request)


def oal_error_to_api(exc: OALError) -> APIError:
    """Our error family as HTTP: lookups 404 (410 for a job the queue lost), state conflicts 409, bad content 422."""
    if isinstance(exc, JobLostError):  # before JobNotFoundError, its base: the job existed and is gone
        return APIError(410, "job_lost", str(exc))
    if isinstance(exc, JobNotFoundError | DataNotFoundError):
        return APIError(404, "not_found", str(exc))
    if isinstance(exc, JobStateError):
        return APIError(409, "conflict", str(exc))
    if isinstance(exc, SpaceMismatchError):
        return APIError(422, "space_mismatch", str(exc))
    if isinstance(exc, EmbeddingSetError):
        return APIError(422, "invalid_embedding_set", str(exc))
    if isinstance(exc, ConfigError | UnsafePathError):
        return APIError(422, "invalid_request", str(exc))
    return APIError(400, "refused", str(exc))
