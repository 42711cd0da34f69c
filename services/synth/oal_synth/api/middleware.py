"""ASGI middleware: the request-body limit and per-route request counting.

Both are plain ASGI (not BaseHTTPMiddleware), so a body is streamed through them, never buffered.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oal_synth.api.errors import error_body
from oal_synth.api.metrics import ApiMetrics


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
            await _send_error(send, 400, "bad_request", "Content-Length header is not a non-negative integer")
            return
        if declared is not None and declared > self.max_body_bytes:
            await _send_error(send, 413, "body_too_large", BodyTooLargeError(self.max_body_bytes).detail)
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
            await _send_error(send, 413, "body_too_large", exc.detail)


class RequestMetricsMiddleware:
    """Count every answered request by method, route template (not raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.count_request(scope.get("method", "?"), template, status)


def _content_length(scope: Scope) -> int | None:
    """Declared body length; None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message)).encode()
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
