"""Request ids: one per request, in the `X-Request-ID` header of every answer and in every error body.

A client that sends its own id (a proxy's, a trace's) gets it back if it is sane: 1 to 128
characters of letters, digits and `-_.:`, nothing that could break a log line or a header.
Otherwise the API makes one. Logs of a failed request carry the same id.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import HTTPConnection
from starlette.types import Scope

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STATE_KEY = "request_id"


def accepted_request_id(given: str | None) -> str:
    """The client's id when it is sane, else a fresh one (32 hex characters)."""
    if given is not None and _SANE_ID.match(given):
        return given
    return uuid.uuid4().hex


def assign_request_id(scope: Scope) -> str:
    """Pick the request's id from its headers and keep it in the scope's state for handlers."""
    given = next((value.decode("latin-1") for name, value in scope.get("headers", ()) if name == _HEADER_KEY), None)
    request_id = accepted_request_id(given)
    scope.setdefault("state", {})[_STATE_KEY] = request_id
    return request_id


def request_id_of(connection: HTTPConnection | Scope) -> str | None:
    """The id `assign_request_id` gave this request; None outside the middleware (unit tests)."""
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    return (scope.get("state") or {}).get(_STATE_KEY)
