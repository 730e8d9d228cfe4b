"""ResponseRewriter on a streamed, inspected answer, without a server: the SSE events vLLM would send go in, the
rewritten events come out with each token's features read from the records the workers sent (the catalog and
service of tests/test_service.py: SAE "a", feature 7 labelled "bridge"), the token ids the plugin asked vLLM for
dropped, and the inbox looked at once per event (its socket is read on every streamed token of every stream)."""

import asyncio
import json
import time

from steer_adapters.vllm.api.rewriter import ResponseRewriter
from steer_plugin.monitor import inbox as observe_inbox
from steer_plugin.monitor import transport
from steer_plugin.request.records import TokenRecord
from tests.test_service import service

PROMPT_LEN = 3


def event(token_id: int, text: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "token_ids": [token_id]}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def test_streamed_inspect_events_carry_each_tokens_features_and_pull_once_per_event(monkeypatch):
    svc = service()
    request = svc.rewrite_request(
        {"prompt": "hi", "stream": True, "steering": {"inspect": {"top_k": 2, "saes": ["a"]}}}
    )
    sent: list[dict] = []

    async def downstream(message):
        sent.append(message)

    rewriter = ResponseRewriter(svc, request, downstream, stream=True)
    inbox = rewriter.observation.inbox
    # Position P-1+k predicts generated token k: two generated tokens, read at positions 2 and 3.
    transport.post(
        request.observe.to,
        [
            TokenRecord(2, PROMPT_LEN, "a", ((7, 3.0), (4, 1.0), (5, 0.5))),
            TokenRecord(3, PROMPT_LEN, "a", ((5, 2.5),)),
        ],
    )
    transport.flush()
    deadline = time.monotonic() + 30
    while not inbox.boxes[request.observe.cid] and time.monotonic() < deadline:  # (a real socket)
        inbox.wait(0.01)
    takes = []
    take = observe_inbox.Inbox.take
    monkeypatch.setattr(observe_inbox.Inbox, "take", lambda self, cid: takes.append(cid) or take(self, cid))

    async def stream():
        await rewriter.send({"type": "http.response.start", "status": 200, "headers": []})
        for body in (event(11, " the"), event(12, " bridge", finish="length")):
            await rewriter.send({"type": "http.response.body", "body": body, "more_body": True})
        await rewriter.send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    asyncio.run(stream())
    rewriter.close()
    bodies = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    events = [json.loads(e[len(b"data: ") :]) for e in bodies.split(b"\n\n") if e.startswith(b"data: {")]
    choices = [e["choices"][0] for e in events]
    assert [c["steering"]["tokens"] for c in choices] == [
        [
            {
                "a": [
                    {"index": 7, "activation": 3.0, "label": "bridge"},
                    {"index": 4, "activation": 1.0, "label": None},
                ]
            }
        ],
        [{"a": [{"index": 5, "activation": 2.5, "label": None}]}],
    ]
    assert all("token_ids" not in c for c in choices)  # the client did not ask for them
    assert bodies.endswith(b"data: [DONE]\n\n")
    # One look at the inbox per event with tokens (the answer's end reads what is left once more).
    assert len(takes) <= len(events) + 1, takes
    assert request.observe.cid not in inbox.boxes  # closed with the response
