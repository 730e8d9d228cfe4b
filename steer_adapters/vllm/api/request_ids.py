"""Which id a steered request's signed plan is bound to (request/wire.py Binding), the way vLLM picks it.

vLLM builds a request's engine id from the X-Request-Id header, else the body's `request_id` (only that on
/v1/responses); when the client gave neither, the middleware chooses one and sends it as the header.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from steer_plugin.request.schema import SpecError

if TYPE_CHECKING:
    from steer_plugin.service import RewrittenRequest

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")

REQUEST_ID_HEADER = b"x-request-id"
RESPONSES_TURNS = 16  # /v1/responses may run several engine requests (tool turns) under one plan


def assign_request_id(scope: dict, body: dict) -> tuple[str, str | None]:
    """(the id vLLM will build the request's engine id from, a value for X-Request-Id to send it or None) —
    what a signed plan is bound to (request/wire.py Binding). vLLM takes the X-Request-Id header, else the
    body's `request_id` (only that on /v1/responses); when the client gave neither, a fresh id is chosen."""
    header = dict(scope["headers"]).get(REQUEST_ID_HEADER)
    given = body.get("request_id")
    if scope["path"] == "/v1/responses":
        if not isinstance(given, str):
            given = body["request_id"] = f"resp_{uuid.uuid4().hex}"
        return _bindable(given, "request_id"), None
    if header is not None:
        return _bindable(header.decode("latin-1"), "x-request-id"), None
    if isinstance(given, str) and scope["path"] in COMPLETION_PATHS:
        return _bindable(given, "request_id"), None
    fresh = uuid.uuid4().hex
    return fresh, fresh


def _bindable(request_id: str, field: str) -> str:
    if not 1 <= len(request_id) <= 256:
        raise SpecError(field, "a steered request's id must be 1 to 256 characters")
    return request_id


def with_request_id(scope: dict, request: RewrittenRequest | None) -> dict:
    """`scope` with the X-Request-Id header `request` was bound to, when the middleware chose it."""
    if request is None or request.request_id_header is None:
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != REQUEST_ID_HEADER]
    return {**scope, "headers": [*headers, (REQUEST_ID_HEADER, request.request_id_header.encode())]}
