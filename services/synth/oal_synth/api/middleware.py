"""ASGI middleware: request ids and the last-resort 500, the request-body limit, per-route metrics.

All are plain ASGI (not BaseHTTPMiddleware), so a body is streamed through them, never buffered.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oal_synth.api.errors import error_body
from oal_synth.api.metrics import ApiMetrics
from oal_synth.api.request_id import REQUEST_ID_HEADER, assign_request_id, request_id_of

logger = logging.getLogger(__name__)


class RequestContextMiddleware:
    """Give each request an id (answered in `X-Request-ID`) and answer anything unhandled as JSON 500.

    Outermost of our middleware, so it also sees what the others raise. An `Exception` handler
    registered with Starlette would run in ServerErrorMiddleware, which re-raises after answering
    (the server then logs the traceback a second time, without our id); catching here logs it
    once, with the id the client got.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = assign_request_id(scope)
        header = (REQUEST_ID_HEADER.lower().encode("latin-1"), request_id.encode("latin-1"))
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s: unhandled error in %s %s", request_id, scope.get("method"), scope.get("path"))
            if response_started:  # nothing can be said any more; the server closes the connection
                raise
            message = (
                "unexpected server error; nothing is known to have changed. Quote request id "
                f"{request_id} when reporting it"
            )
            await _send_error(send_with_id, 500, "internal_error", message, request_id)


class BodyTooLargeError(StarletteHTTPException):
    """Raised from `receive` once a streamed body passes the limit; answered 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (OAL_MAX_BODY_BYTES)")


class BodyLimitMiddleware:
    """Refuse bodies over `max_body_bytes` with 413 before reading them whole.

    A declared Content-Length over the limit is refused before a byte is read; a body without
    one (chunked) is counted as it streams and refused the moment it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            message = "Content-Length header is not a non-negative integer"
            await _send_error(send, 400, "bad_request", message, request_id_of(scope))
            return
        if declared is not None and declared > self.max_body_bytes:
            message = BodyTooLargeError(self.max_body_bytes).detail
            await _send_error(send, 413, "body_too_large", message, request_id_of(scope))
            return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError as exc:
            # Routes that read the body themselves let this through; answer it here.
            if response_started:
                raise
            await _send_error(send, 413, "body_too_large", exc.detail, request_id_of(scope))


class RequestMetricsMiddleware:
    """Count and time every answered request by method, route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            template = getattr(scope.get("route"), "path", None)  # set by the router when a route matched
            self.metrics.count_request(scope.get("method", "?"), template, status, time.perf_counter() - started)


def _content_length(scope: Scope) -> int | None:
    """Declared body length; None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None


async def _send_error(send: Send, status: int, code: str, message: str, request_id: str | None) -> None:
    body = json.dumps(error_body(code, message, request_id=request_id)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
