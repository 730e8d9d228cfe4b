"""Reading one text's residual through the engine, for a fit: an internal completion (max_tokens 1, the
prompt observed) whose plan asks the workers to write back the raw residual rows at some layers
(ObservePlan.residuals: only this module plans that, never the public `steering` field), read back from the
API process's inbox like any observation. The inference server's side is one call, `CallEngine`: the completion
body, sent with its request id (the id the plan is bound to) to the engine, past the plugin's own checks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np

from steer_plugin.monitor import inbox as observe_inbox
from steer_plugin.request.records import ResidualRecord
from steer_plugin.request.schema import SpecError
from steer_plugin.request.wire import WIRE_KEY, Binding, ObservePlan, RequestPlan

# (completion body, request id to send it under) -> (HTTP status, JSON answer)
CallEngine = Callable[[dict, str], Awaitable[tuple[int, dict]]]


# How long the residual rows may take to arrive after the completion answered (they are sent before its token
# is sampled, so they are normally here first).
ARRIVAL_TIMEOUT_S = 5.0


def residual_plan(layers: tuple[int, ...], request_id: str, reply_to: str) -> RequestPlan:
    """Nothing steered; every prompt position observed (so computed, never read from the prefix cache) and
    its residual after each of `layers` written back to `reply_to`; bound to `request_id`, for one engine
    request."""
    observe = ObservePlan(uuid.uuid4().hex, (), 1, True, residuals=tuple(layers), reply_to=reply_to)
    return RequestPlan.build([], observe=observe, binding=Binding.new(request_id, 1))


def completion_body(token_ids: list[int], plan: RequestPlan, model: str | None) -> dict:
    body = {
        "prompt": list(token_ids),
        "max_tokens": 1,
        "temperature": 0,
        "vllm_xargs": {WIRE_KEY: plan.encode()},
    }
    if model is not None:
        body["model"] = model
    return body


def rows_by_layer(
    records: list[ResidualRecord], layers: tuple[int, ...], tokens: int
) -> dict[int, np.ndarray]:
    """{layer: [tokens, d]} in position order; ValueError when a position is missing."""
    out = {}
    for layer in layers:
        found = {r.pos: r for r in records if r.layer == layer}
        if sorted(found) != list(range(tokens)):
            raise ValueError(f"layer {layer}: the workers wrote {len(found)} of {tokens} positions")
        out[layer] = np.stack([found[pos].values() for pos in range(tokens)])
    return out


async def read_residuals(
    call: CallEngine, token_ids: list[int], layers: tuple[int, ...], model: str | None, field: str
) -> dict[int, np.ndarray]:
    """The residual after each of `layers` at every position of `token_ids`, {layer: [T, d] float32}, as the
    workers captured it (unsteered). `field`: the body field the text came from (named in errors)."""
    request_id = f"steer-fit-{uuid.uuid4().hex}"
    inbox = observe_inbox.inbox()
    plan = residual_plan(layers, request_id, inbox.address)
    cid = plan.observe.cid
    inbox.open(cid)
    try:
        status, answer = await call(completion_body(token_ids, plan, model), request_id)
        if status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            message = error.get("message") if isinstance(error, dict) else str(answer)[:300]
            raise SpecError(field, f"the engine refused the text: {message}", 400 if status < 500 else 502)
        records = await _arrived(inbox, cid, len(layers) * len(token_ids))
    finally:
        inbox.close(cid)
    try:
        return rows_by_layer(records, layers, len(token_ids))
    except ValueError as err:
        raise SpecError(field, f"the residual did not come back: {err}", 500) from None


async def _arrived(inbox, cid: str, count: int) -> list[ResidualRecord]:
    """The request's residual records, waiting (bounded) until `count` have arrived."""
    records: list[ResidualRecord] = []
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while True:
        records += [r for r in inbox.take(cid) if isinstance(r, ResidualRecord)]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.005)  # the event loop serves others meanwhile
