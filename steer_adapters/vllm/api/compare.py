"""`steering.compare`: the steered and the default completion of one request, served as one OpenAI response.

The middleware runs the two variants as two requests through vLLM at once (so they batch together, and the
default one shares prefix-cache blocks with other unsteered traffic as usual) and `CompareMerger` joins their
answers: the steered choices keep their indices 0..n-1, the default ones become n..2n-1, and every choice says
which it is in `steering.variant`. Streaming: chunks of both go out as they come, one usage chunk (summed) and
one `[DONE]` at the end. An error answer of either variant is sent instead of the merge.
"""

from __future__ import annotations

import asyncio

from steer_adapters.vllm.api import sse

STEERED, DEFAULT = "steered", "default"
VARIANTS = (STEERED, DEFAULT)


def _sum_usage(usages: list[dict]) -> dict:
    """Token counts of both variants added up (the work the request cost)."""
    total: dict = {}
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
    return total


class CompareMerger:
    """Receives the ASGI messages of both variants (`sender(variant)`) and sends one response downstream."""

    def __init__(self, send, stream: bool, n: int):
        self.downstream = send
        self.stream = stream
        self.n = n
        self.starts: dict[str, dict] = {}
        self.held: dict[str, list[dict]] = {v: [] for v in VARIANTS}  # messages before the status is known
        self.decided = asyncio.Event()
        self.failed: str | None = None  # the variant whose error answer is sent
        self.partial = {v: b"" for v in VARIANTS}  # streaming: an incomplete event of each variant
        self.bodies = {v: b"" for v in VARIANTS}  # non-streaming: each variant's whole body
        self.usage: list[dict] = []  # streaming: the usage chunks, merged at the end
        self.usage_chunk: dict | None = None

    def sender(self, variant: str):
        async def send(message):
            await self._receive(variant, message)

        return send

    async def _receive(self, variant: str, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.starts[variant] = message
            if len(self.starts) == len(VARIANTS):
                await self._decide()
            return
        if not self.decided.is_set():
            self.held[variant].append(message)
            return
        await self._body(variant, message)

    async def _decide(self) -> None:
        """Both statuses are in: 200 for both, or the first error answer (in variant order) goes out."""
        self.failed = next((v for v in VARIANTS if self.starts[v]["status"] != 200), None)
        if self.failed is not None or self.stream:
            start = self.starts[self.failed or STEERED]
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await self.downstream({**start, "headers": headers} if self.failed is None else start)
        self.decided.set()
        for variant in VARIANTS:
            for message in self.held[variant]:
                await self._body(variant, message)
            self.held[variant] = []

    async def _body(self, variant: str, message: dict) -> None:
        if message["type"] != "http.response.body":
            return
        if self.failed is not None:
            if variant == self.failed:
                await self.downstream(message)
            return
        if not self.stream:
            self.bodies[variant] += message.get("body", b"")
            return
        events, self.partial[variant] = sse.split_events(self.partial[variant], message.get("body", b""))
        out = b"".join(self._event(variant, e) for e in events)
        if out:
            await self.downstream({"type": "http.response.body", "body": out, "more_body": True})

    def _label(self, variant: str, choices: list[dict]) -> None:
        for choice in choices:
            if variant == DEFAULT:
                choice["index"] = choice.get("index", 0) + self.n
            steering = choice.get("steering") or {}
            choice["steering"] = {**steering, "variant": variant}

    def _event(self, variant: str, event: bytes) -> bytes:
        data = sse.event_json(event)
        if data is None:
            return b""  # one [DONE] goes out at the end
        if not data.get("choices") and data.get("usage"):  # stream_options.include_usage: summed, at the end
            self.usage.append(data["usage"])
            self.usage_chunk = data
            return b""
        self._label(variant, data.get("choices", []))
        return sse.data_event(data)

    async def finish(self) -> None:
        """Both variants are done: the merged answer (or the rest of the stream) goes out."""
        if not self.decided.is_set():  # a variant ended without answering (cancelled): nothing more to send
            return
        if self.failed is not None:
            return
        if self.stream:
            tail = b""
            if self.usage_chunk is not None:
                tail += sse.data_event({**self.usage_chunk, "usage": _sum_usage(self.usage)})
            await self.downstream({"type": "http.response.body", "body": tail + sse.DONE + sse.SEPARATOR})
            return
        merged = sse.loads(self.bodies[STEERED])
        default = sse.loads(self.bodies[DEFAULT])
        self._label(STEERED, merged.get("choices", []))
        self._label(DEFAULT, default.get("choices", []))
        merged["choices"] = merged.get("choices", []) + default.get("choices", [])
        if merged.get("usage") and default.get("usage"):
            merged["usage"] = _sum_usage([merged["usage"], default["usage"]])
        body = sse.dumps(merged)
        start = self.starts[STEERED]
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.downstream({**start, "headers": headers})
        await self.downstream({"type": "http.response.body", "body": body})
