"""Every error leaves the API as JSON `{"error": {"code", "message", "field"?}}`, never as a bare 500.

The message says what to change; `field` is the dotted path of the request field at fault
(`sampler.k`, `embeddings.set_id`, `generator`). Handlers map:
pydantic validation -> 422, our OALError family -> 4xx, Redis away -> 503 with Retry-After.
"""

from __future__ import annotations

import logging
import re
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
from oal_synth.queue import JobNotFoundError, JobStateError

logger = logging.getLogger(__name__)

#: Seconds a client should wait before retrying when Redis is away or the queue is full.
REDIS_RETRY_AFTER_S = 5
QUEUE_FULL_RETRY_AFTER_S = 30

# Validation loc entries that are not request fields: where the value came from, union member names.
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}
_UNION_MEMBER = re.compile(r"^[A-Z][A-Za-z0-9]*$")
# Error types that say "this is the wrong union member" rather than "this value is wrong".
_SHAPE_ERRORS = {"missing", "extra_forbidden"}


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
    code: str, message: str, field: str | None = None, details: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details:
        error["details"] = details
    return {"error": error}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.code, error.message, error.field, error.details),
        status_code=error.status_code,
        headers=error.headers,
    )


# ---------------------------------------------------------------------------- validation errors


def validation_problems(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """pydantic errors -> [{field, message}], with union noise removed.

    A value for `embeddings` is tried against each union member, so pydantic reports errors for
    every member (`embeddings.EmbeddingsFromSet.set_id` missing, ...). We keep the errors of the
    member the client evidently meant (fewest missing/unexpected keys) and drop member names from
    the path; when no member fits at all, one problem lists the keys each member needs.
    """
    plain: list[dict[str, str]] = []
    by_union: dict[str, dict[str, list[tuple[str, str, str]]]] = {}
    for error in errors:
        if error.get("type") == "json_invalid":  # loc is ("body", character position)
            position = error.get("loc", ("body", "?"))[-1]
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            plain.append({"field": "body", "message": f"not valid JSON ({reason} at character {position})"})
            continue
        loc = [str(part) for part in error.get("loc", ()) if str(part) not in _LOC_SOURCES]
        message = _clean_message(error)
        member_at = next((i for i, part in enumerate(loc) if _UNION_MEMBER.match(part)), None)
        if member_at is None:
            plain.append({"field": ".".join(loc) or "body", "message": message})
            continue
        prefix, member = ".".join(loc[:member_at]), loc[member_at]
        field = ".".join(loc[:member_at] + loc[member_at + 1 :])
        by_union.setdefault(prefix, {}).setdefault(member, []).append((error.get("type", ""), field, message))
    for prefix, members in by_union.items():
        plain.extend(_pick_union_member(prefix, members))
    return plain


def _pick_union_member(prefix: str, members: dict[str, list[tuple[str, str, str]]]) -> list[dict[str, str]]:
    def misfit(problems: list[tuple[str, str, str]]) -> tuple[int, int]:
        return sum(kind in _SHAPE_ERRORS for kind, _, _ in problems), len(problems)

    best = min(members.values(), key=misfit)
    if misfit(best)[0] == len(best):  # every member is the wrong shape: say what each one needs
        needs = [
            "{" + ", ".join(field.rsplit(".", 1)[-1] for kind, field, _ in problems if kind == "missing") + "}"
            for problems in members.values()
        ]
        return [{"field": prefix, "message": f"{prefix} must have the keys of one of: {' or '.join(needs)}"}]
    return [{"field": field, "message": message} for _, field, message in best]


def _clean_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


# ---------------------------------------------------------------------------- handlers


def redis_location(redis_url: str) -> str:
    """host:port/db of a Redis URL, never its password."""
    parts = urlsplit(redis_url)
    return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = validation_problems(list(exc.errors()))
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or first["message"]
        return error_response(APIError(422, "invalid_request", message, field=first["field"], details=problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return error_response(APIError(exc.status_code, code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_away(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        where = redis_location(request.app.state.settings.redis_url)
        logger.warning("Redis at %s unreachable while serving %s %s: %s", where, request.method, request.url.path, exc)
        message = (
            f"the job queue (Redis at {where}) is unreachable; nothing was changed. "
            f"Retry in {REDIS_RETRY_AFTER_S} s; if it persists, check that Redis is running"
        )
        return error_response(
            APIError(503, "queue_unavailable", message, headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})
        )

    @app.exception_handler(OALError)
    async def _oal_error(request: Request, exc: OALError) -> JSONResponse:
        return error_response(oal_error_to_api(exc))


def oal_error_to_api(exc: OALError) -> APIError:
    """Our error family as HTTP: lookups 404, state conflicts 409, bad content 422."""
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
