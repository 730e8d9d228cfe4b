"""The engine-core process: the prefix-cache salt of steered requests.

vLLM's engine core builds a `Request` from each `EngineCoreRequest` and hashes its KV blocks for the prefix cache.
A request's plan is decoded once here (request_plan) to salt the blocks that hold steered positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from steer_adapters.vllm import preflight
from steer_plugin.request.wire import RequestPlan, admit_plan


class KVSalt(NamedTuple):
    """Prefix-cache key of KV computed under steering: blocks holding any position >= `first_position` get
    `salt` in their hash (and so does every later block, through the hash chain)."""

    salt: str
    first_position: int


def request_plan(extra_args: dict | None, request_id: str) -> RequestPlan | None:
    """A request's plan, or None (no steering, or a message we did not sign, bound to another request, expired
    or replayed: wire.admit_plan replaces it, so the workers never see it and the request is computed unsteered
    and its KV is shareable)."""
    return admit_plan(extra_args, request_id)


def kv_salt(plan: RequestPlan | None, num_prompt_tokens: int) -> KVSalt | None:
    """The salt of a request's steered blocks, or None (nothing steered)."""
    if plan is None or plan.salt is None:
        return None
    first = plan.first_steered_position(num_prompt_tokens)
    return None if first is None else KVSalt(plan.salt, first)


_SALT_ATTR = "_steer_kv_salt"


def patch_prefix_cache() -> None:
    """Steered KV never enters the shared prefix cache under unsteered hashes, and is never read by a
    request that does not share the steering:

    - each request's block hasher marks the request with its KVSalt, and the per-block extra keys (vLLM's
      `generate_block_hash_extra_keys`, used for LoRA and multimodal inputs the same way) carry the salt on
      every block that contains a steered position. Blocks before the first steered position keep their
      plain hashes: generation-only steering still reads (and shares) the unsteered prompt prefix.
    - a request that reports prompt-token features must compute every prompt position, so it skips reading
      the prefix cache (cached positions have no residual to read).
    """
    preflight.check("engine_core")  # refuses to start, naming what moved, on a vLLM we do not fit
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    if getattr(kv_cache_utils.generate_block_hash_extra_keys, "_steer_patched", False):
        return
    original_keys = kv_cache_utils.generate_block_hash_extra_keys

    @functools.wraps(original_keys)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = original_keys(request, start_token_idx, end_token_idx, start_mm_idx)
        salt: KVSalt | None = getattr(request, _SALT_ATTR, None)
        if salt is not None and end_token_idx > salt.first_position:
            keys = (*(keys or ()), ("steer_plugin", salt.salt))
        return keys, next_mm

    generate_block_hash_extra_keys._steer_patched = True
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys

    original_from = Request.from_engine_core_request.__func__

    @functools.wraps(original_from)
    def from_engine_core_request(cls, request, block_hasher, *args, **kwargs):
        params = request.sampling_params
        # The request's one decode in the engine core: its salt and whether its prompt is observed.
        plan = request_plan(params.extra_args if params is not None else None, request.request_id)
        if plan is not None and plan.salt is not None and block_hasher is not None:
            plain_hasher = block_hasher

            def block_hasher(req, _plain=plain_hasher, _plan=plan):
                if not hasattr(req, _SALT_ATTR):  # first called inside Request.__init__
                    setattr(req, _SALT_ATTR, kv_salt(_plan, req.num_prompt_tokens))
                return _plain(req)

            # vLLM 0.34: prompt block hashes a frontend computed (EngineCoreRequest.block_hashes) know no salt;
            # the engine hashes the prompt itself instead.
            if args:
                args = (None, *args[1:])
            elif kwargs.get("block_hashes") is not None:
                kwargs["block_hashes"] = None
        if plan is not None and plan.observes_prompt:
            # Cached prompt positions have no residual to read (a public SamplingParams field, read by Request).
            params.skip_reading_prefix_cache = True
        return original_from(cls, request, block_hasher, *args, **kwargs)

    Request.from_engine_core_request = classmethod(from_engine_core_request)
