"""ASGI plumbing the middleware needs: reading and replaying a request body, sending an answer, rewriting one.

Small and framework-free on purpose: the middleware wraps vLLM's FastAPI app from outside, so it sees raw ASGI
messages, and a replayed body must keep vLLM's own disconnect handling (receive() after the body waits on the
real client).
"""

from __future__ import annotations

import asyncio
import json


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def send_body(
    send, status: int, body: bytes, content_type: bytes, *headers: tuple[bytes, bytes]
) -> None:
    length = str(len(body)).encode()
    start_headers = [(b"content-type", content_type), (b"content-length", length), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send, status: int, body: bytes) -> None:
    await send_body(send, status, body, b"application/json")


def with_body(scope: dict, body: bytes, receive_client):
    """A new scope and receive() that replay `body` (content-length fixed), then wait on the real client
    (vLLM cancels a request when receive() reports a disconnect)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive_client()

    return {**scope, "headers": headers}, receive


def until_stopped(receive, stop: asyncio.Event):
    """receive() that also reports a disconnect once `stop` is set (the app then cancels its request)."""

    async def watched():
        waiter = asyncio.ensure_future(receive())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, stopper):
                if not task.done():
                    task.cancel()
        return waiter.result() if waiter in done else {"type": "http.disconnect"}

    return watched


async def rewrite_response(app, scope, receive, send, transform) -> None:
    """Run `app`, then send its 200 answer with `transform(body, content_type)` as the body (content-length
    fixed). The body is buffered, asked for uncompressed; other answers pass through unchanged."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
    start: dict | None = None
    chunks: list[bytes] = []

    async def buffered(message):
        nonlocal start
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                return await send(message)
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        response_headers = {k.lower(): v for k, v in start["headers"]}
        body = b"".join(chunks)
        if b"content-encoding" not in response_headers:
            body = transform(body, response_headers.get(b"content-type", b"").decode("latin-1"))
        out = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        out.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": out})
        await send({"type": "http.response.body", "body": body})

    await app({**scope, "headers": headers}, receive, buffered)


def json_as_vllm_reads_it(raw: bytes) -> object | None:
    """The body as vLLM's routes parse it (Starlette's `request.json()`: json.loads on the bytes, which reads
    UTF-8, UTF-16 and UTF-32), or None when it is not JSON."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (or JSON vLLM cannot read either)
        return None


class ResponseState:
    """Wraps `send` to know whether a response has started (an error can then no longer be sent)."""

    def __init__(self, send):
        self.downstream = send
        self.started = False

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self.downstream(message)
