"""A signed plan is bound to its request, a window and a use count (request/wire.py), on a real engine: the demo
model with the plugin, engine core and worker in this process. A bound plan steers the request it names, once; a
replay of it (as a plan captured from a log would be sent again), a plan bound to another request and an expired
one run plain, exactly like an unsteered request."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from steer_plugin.request.wire import WIRE_KEY, Binding, RequestPlan

from .conftest import chat_ids, inprocess_engine, resolve

pytestmark = pytest.mark.engine

STEERING = {"features": [{"sae": "demo", "index": 5, "op": "add", "value": 0.5, "normalize": True}]}


@pytest.fixture(scope="module")
def llm(demo_assets, steer_config_path):
    with inprocess_engine(str(demo_assets.model_dir), steer_config_path) as engine:
        yield engine


def first_logprob(llm, request_id: str, prompt_ids: list[int], wire: str | None) -> float:
    """The first token's log-prob of one request added under `request_id` (vLLM appends its own suffix)."""
    params = SamplingParams(
        temperature=0.0, max_tokens=2, logprobs=0, extra_args={WIRE_KEY: wire} if wire else None
    )
    engine = llm.llm_engine
    engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                result = out
    (first,) = result.outputs[0].logprobs[0].values()
    return first.logprob


def test_a_bound_plan_steers_its_request_once(llm, assets, prompt_ids):
    ops = resolve(assets, STEERING)
    plain = first_logprob(llm, "plain-0", prompt_ids, None)
    bound = RequestPlan.build(ops, binding=Binding.new("chatcmpl-bound-1")).encode()
    steered = first_logprob(llm, "chatcmpl-bound-1", prompt_ids, bound)
    assert abs(steered - plain) > 1e-3  # applied
    # The same signed plan again, on a request whose id contains the bound one: a replay, refused.
    assert first_logprob(llm, "chatcmpl-bound-1", prompt_ids, bound) == plain
    moved = RequestPlan.build(ops, binding=Binding.new("chatcmpl-other")).encode()
    assert first_logprob(llm, "chatcmpl-mine", prompt_ids, moved) == plain
    expired = RequestPlan.build(ops, binding=Binding.new("chatcmpl-late", ttl=-1)).encode()
    assert first_logprob(llm, "chatcmpl-late", prompt_ids, expired) == plain
    two = RequestPlan.build(ops, binding=Binding.new("chatcmpl-two", uses=2)).encode()
    assert first_logprob(llm, "chatcmpl-two", prompt_ids, two) == steered
    assert first_logprob(llm, "chatcmpl-two", prompt_ids, two) == steered
    assert first_logprob(llm, "chatcmpl-two", prompt_ids, two) == plain
    # steering_args plans (vLLM's LLM class, in-process) are unbound and keep working.
    unbound = RequestPlan.build(ops).encode()
    assert first_logprob(llm, "any-id", prompt_ids, unbound) == steered


@pytest.fixture(scope="module")
def prompt_ids(demo_assets) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets.model_dir))
    return chat_ids(tokenizer, "Tell me about the Golden Gate Bridge.")
