"""The completion response of a steered or observed request, rewritten on its way to the client: each choice
gets `steering` (the applied operations, per-token features like `logprobs`, traced features, an `abort_when`
stop), chunk by chunk when streaming; the monitoring line is written when the response ends."""

from __future__ import annotations

import logging

from steer_adapters.vllm.api import sse
from steer_plugin.service import RewrittenRequest, SteeringService

logger = logging.getLogger("steer_plugin")


class ResponseRewriter:
    """Adds `steering` to each choice of a completion response: the applied ops, and per-token features
    (like `logprobs`), chunk by chunk when streaming. Writes the monitoring line when the response ends."""

    def __init__(
        self, service: SteeringService, request: RewrittenRequest, send, stream: bool, judge_token=None
    ):
        self.service = service
        self.request = request
        self.downstream = send
        self.stream = stream
        self.observation = service.observation(request)
        self.aborts = bool(request.abort or request.planned.probe_abort)  # abort_when on a feature or a probe
        # The probe -> judge cascade of a monitored request (monitor/judge.py), fed as tokens arrive.
        self.cascade = service.judge_cascade(request, lambda: self.response_id, judge_token)
        self.answer = ""  # the answer so far (choice 0: monitoring needs n = 1)
        self.generated = 0  # its tokens so far (abort_when needs n = 1 too)
        self.done = False  # the stream's end went out
        self.status = 200
        self.start: dict | None = None
        self.buffer = b""
        self.reported: set[int] = set()  # choice indices whose `applied` went out (first chunk of each)
        self.response_id = self.model = None
        self.closed = False

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status != 200 or self.stream:
                return await self.downstream(message)
            self.start = message  # sent with the rewritten body
            return
        if message["type"] != "http.response.body" or self.status != 200:
            return await self.downstream(message)
        if self.stream:
            events, self.buffer = sse.split_events(self.buffer, message.get("body", b""))
            parsed = [(event, sse.event_json(event)) for event in events]
            await self._settle([data for _, data in parsed])
            out = b"".join(self._rewrite_event(event, data) for event, data in parsed)
            if message.get("more_body") and not out:
                return
            return await self.downstream({**message, "body": out})
        self.buffer += message.get("body", b"")
        if message.get("more_body"):
            return
        data = sse.loads(self.buffer)
        inspect = self.request.inspect
        await self._settle([data], prompt=isinstance(data, dict) and inspect is not None and inspect.prompt)
        body = self._rewrite_full(self.buffer, data)
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.downstream({**self.start, "headers": headers})
        await self.downstream({"type": "http.response.body", "body": body})

    async def _settle(self, chunks: list, prompt: bool = False) -> None:
        """Before `chunks` (parsed events or body) are rewritten: wait, without holding up the other streams,
        for the reads they report (their tokens'; at the answer's end, the last token's that its abort_when
        report and probe summary need)."""
        if self.observation is None:
            return
        count, ends = 0, False
        for data in chunks:
            for choice in data.get("choices", []) if isinstance(data, dict) else ():
                count += len(choice.get("token_ids") or [])
                ends = ends or choice.get("finish_reason") is not None
        last = ends and (self.aborts or bool(self.request.probes))
        await self.observation.settle(self.generated + count, last=last, prompt=prompt)

    async def settle_end(self) -> None:
        """Once the answer went out, however it ended: wait (as `_settle`) for its last token's reads, which the
        monitoring line written by `close` counts."""
        if self.observation is not None and not self.closed:
            await self.observation.settle(self.generated, last=True)

    def _choice_steering(self, choice: dict, count: int, first: bool) -> dict:
        info: dict = {}
        self.generated += count
        if first:
            info["applied"] = self.service.applied(self.request.ops)
            if self.request.traced:
                info["traced_features"] = self.observation.traced_features()
        if self.observation is not None and self.request.inspect is not None:
            reads = self.observation.next_tokens(count)
            info["tokens"] = [r.features for r in reads]
            if self.request.traced:
                info["traced"] = [r.traced for r in reads]
            if self.request.probes:
                info["probes"] = [r.probes for r in reads]
                if choice.get("finish_reason") is not None:
                    info["probe_summary"] = self.observation.probe_summary()
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            choice.pop("token_ids", None)
        if self.aborts and choice.get("finish_reason") == "stop":
            abort = self.observation.abort()
            if abort is not None:  # the end-of-sequence token was forced by the worker (Steerer.force_aborts)
                choice["finish_reason"] = "abort_when"
                info["abort"] = abort
        return info

    def _feed_cascade(self, choice: dict) -> None:
        delta = choice.get("delta") or choice.get("message") or {}
        self.answer += delta.get("content") or choice.get("text") or ""
        try:
            scores = self.observation.probe_scores()
            if self.observation.prompt_len is not None:
                self.cascade.feed(scores, self.observation.prompt_len - 1, self.answer)
        except Exception:  # monitoring never breaks the answer
            logger.exception("steer_plugin: the judge cascade failed; this answer is not judged")
            self.cascade = None

    async def finish_judged(self) -> None:
        """After a positive verdict stopped the stream (the engine request is cancelled): its last event, the
        choice finished with finish_reason "judge" and the verdict, then the stream's end."""
        if (
            not (self.stream and self.cascade and self.cascade.stopped_by and not self.done)
            or self.status != 200
        ):
            return
        self.done = True
        choice = {"index": 0, "delta": {}, "finish_reason": "judge"}
        choice["steering"] = {"judge": self.cascade.stopped_by._asdict()}
        event = {
            "id": self.response_id,
            "object": "chat.completion.chunk",
            "model": self.model,
            "choices": [choice],
        }
        if "messages" not in self.request.body:
            event["object"] = "text_completion"
            choice.pop("delta")
            choice["text"] = ""
        body = sse.data_event(event) + sse.DONE + sse.SEPARATOR
        await self.downstream({"type": "http.response.body", "body": body, "more_body": False})

    def _rewrite_full(self, raw: bytes, data) -> bytes:
        if not isinstance(data, dict):  # vLLM answers `null` when the client went away before the end
            return raw
        self.response_id, self.model = data.get("id"), data.get("model")
        for choice in data.get("choices", []):
            count = len(choice.get("token_ids") or [])
            choice["steering"] = self._choice_steering(choice, count, first=True)
            if self.cascade is not None and choice.get("index", 0) == 0:
                self._feed_cascade(choice)
            if self.request.inspect is not None and self.request.inspect.prompt:
                reads = self.observation.prompt_tokens()
                choice["steering"]["prompt_tokens"] = [r.features for r in reads]
                choice["steering"]["prompt_sinks"] = sorted(self.observation.sinks)
                if self.request.traced:
                    choice["steering"]["prompt_traced"] = [r.traced for r in reads]
                if self.request.probes:
                    choice["steering"]["prompt_probes"] = [r.probes for r in reads]
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            data.pop("prompt_token_ids", None)
        return sse.dumps(data)

    def _rewrite_event(self, event: bytes, data) -> bytes:
        if not isinstance(data, dict):
            self.done = self.done or event.strip() == sse.DONE
            return event + sse.SEPARATOR
        self.response_id, self.model = data.get("id", self.response_id), data.get("model", self.model)
        for choice in data.get("choices", []):
            count = len(choice.get("token_ids") or [])
            index = choice.get("index", 0)
            choice["steering"] = self._choice_steering(choice, count, first=index not in self.reported)
            self.reported.add(index)
            if self.cascade is not None and index == 0:
                self._feed_cascade(choice)
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            data.pop("prompt_token_ids", None)
        return sse.data_event(data)

    def close(self) -> None:
        if not self.closed and self.observation is not None:
            self.closed = True
            self.observation.finish(self.response_id, self.model)
