"""The OpenAI streaming framing (server-sent events) that vLLM's completion endpoints use: `data: {json}` events
separated by a blank line, ended by `data: [DONE]`. ASGI body chunks need not end on an event boundary.

`loads`/`dumps` are the JSON codec of the responses the adapter rewrites (every streamed event of an observed
request passes through them): msgspec, several times the standard library's speed, compact like vLLM's own
output; the standard library where msgspec cannot (NaN/Infinity tokens in, objects it cannot write out)."""

from __future__ import annotations

import json

import msgspec

SEPARATOR = b"\n\n"
DONE = b"data: [DONE]"


def loads(raw: bytes) -> object:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw)


def dumps(data: object) -> bytes:
    try:
        return msgspec.json.encode(data)
    except (msgspec.EncodeError, OverflowError, TypeError):
        return json.dumps(data).encode()


def split_events(pending: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """(the events `chunk` completes, each without its separator; what stays pending for the next chunk)."""
    events, _, rest = (pending + chunk).rpartition(SEPARATOR)
    return [e for e in events.split(SEPARATOR) if e] if events else [], rest


def event_json(event: bytes) -> dict | None:
    """The JSON object of a `data:` event; None for `[DONE]` and anything else (comments, other fields)."""
    if not event.startswith(b"data: ") or event.strip() == DONE:
        return None
    return loads(event[len(b"data: ") :])


def data_event(data: dict) -> bytes:
    return b"data: " + dumps(data) + SEPARATOR
