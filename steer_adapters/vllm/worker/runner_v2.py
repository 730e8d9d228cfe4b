"""Model Runner V2 (vllm/v1/worker/gpu/model_runner.py, `GPUModelRunner`): the only runner from vLLM 0.34 on, the
CUDA default in 0.33. What the adapter reads and wraps (each listed in internals.py):

- `prepare_inputs(scheduler_output, ...)` returns the `InputBatch` of the coming forward (requests sorted
  decode-first, `idx_mapping_np`: batch position -> the request's persistent slot). `execute_model` calls it only
  for a real step that runs the model, then builds attention metadata and runs the model (or replays a graph)
  with nothing in between that touches our tables; dummy, profile, warm-up and capture runs build
  `InputBatch.make_dummy` instead and never reach it, so they run with the tables disarmed (unsteered).
- Sampling params reach the worker only with a request's first step (`scheduler_output.scheduled_new_reqs`, also
  when a preempted request resumes); we keep each one's prompt length and plan by its persistent slot, which a
  later request overwrites, so nothing needs freeing when requests finish.
- After `execute_model` (the forward) the observed features are read; `abort_when` hits are handed to the
  `AbortWhen` logits processor (abort.py, vLLM's public V2 logits-processor interface), which forces the
  end-of-sequence token when the request's logits are sampled.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import numpy as np

from steer_adapters.vllm import internals
from steer_adapters.vllm.worker import abort
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.request.wire import WIRE_KEY

logger = logging.getLogger("steer_plugin")

_INSTALLED_MARK = "_steer_plugin_v2_requests"


class RequestInfo(NamedTuple):
    """What V2 shows of a request only on its first step, kept by its persistent slot."""

    req_id: str
    num_prompt_tokens: int
    wire: str | None  # SamplingParams.extra_args[WIRE_KEY] (a signed RequestPlan) or None


class SlotRequests:
    """The request in each of V2's persistent request slots, as last seen entering the batch."""

    def __init__(self) -> None:
        self.by_slot: dict[int, RequestInfo] = {}

    def enter(self, new_reqs, input_batch) -> None:
        """Record `scheduler_output.scheduled_new_reqs` (NewRequestData) under the slots this batch gives them."""
        if not new_reqs:
            return
        position = {req_id: i for i, req_id in enumerate(input_batch.req_ids[: input_batch.num_reqs])}
        slots = input_batch.idx_mapping_np
        for new in new_reqs:
            i = position.get(new.req_id)
            if i is None:  # admitted with no token scheduled this step: it enters with a later batch
                continue
            params = new.sampling_params
            extra = (params.extra_args if params is not None else None) or {}
            self.by_slot[int(slots[i])] = RequestInfo(new.req_id, int(new.prompt_len), extra.get(WIRE_KEY))

    def of_batch(self, input_batch) -> list[RequestInfo]:
        """The batch's requests in batch order; RuntimeError when one never entered through prepare_inputs."""
        n = input_batch.num_reqs
        infos = [self.by_slot.get(int(s)) for s in input_batch.idx_mapping_np[:n]]
        unseen = [r for r, info in zip(input_batch.req_ids[:n], infos) if info is None or info.req_id != r]
        if unseen:
            raise RuntimeError(
                f"steer_plugin: requests {unseen} are in the V2 batch but never entered it through "
                "scheduled_new_reqs (vLLM's Model Runner V2 changed how requests reach the worker?)"
            )
        return infos


def batch_view(input_batch, requests: SlotRequests) -> BatchView:
    """The batch of the coming forward, from a V2 InputBatch."""
    n = input_batch.num_reqs
    infos = requests.of_batch(input_batch)
    return BatchView(
        req_ids=list(input_batch.req_ids[:n]),
        # Cumulative token counts in batch order. Under FULL-graph request padding the array has
        # num_reqs_after_padding + 1 entries: the real requests are the first n.
        query_start=input_batch.query_start_loc_np[: n + 1],
        # req_states.num_computed_tokens_np gathered in batch order; V2 writes the positions num_computed +
        # 0..query_len-1 into each request's rows. Exact except for async speculative decoding (refused).
        num_computed=input_batch.num_computed_tokens_np[:n],
        num_prompt=np.array([i.num_prompt_tokens for i in infos], dtype=np.int64),
        wires=[i.wire for i in infos],
    )


def is_v2_runner(runner: Any) -> bool:
    """A Model Runner V2 (or a platform subclass of it, e.g. vllm/v1/worker/cpu/model_runner.py)."""
    return any(
        c.__module__ == internals.V2_RUNNER and c.__name__ == "GPUModelRunner" for c in type(runner).__mro__
    )


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _unsupported(what: str) -> RuntimeError:
    return RuntimeError(f"steer_plugin: vLLM {_vllm_version()} Model Runner V2: {what}")


def check_runner(runner) -> None:
    """Refuse what the per-step tables cannot describe, before anything is wrapped."""
    if not is_v2_runner(runner):
        raise _unsupported(f"{type(runner).__module__}.{type(runner).__name__} is not a Model Runner V2")
    for name in ("prepare_inputs", "execute_model"):
        if not callable(getattr(runner, name, None)):
            raise _unsupported(f"runner has no method {name!r}")
    vllm_config = runner.vllm_config
    if getattr(vllm_config.parallel_config, "prefill_context_parallel_size", 1) > 1:
        # The PCP manager splits each request's rows across ranks after prepare_inputs.
        raise _unsupported(
            "prefill context parallelism re-partitions token rows; steering does not support it"
        )
    if vllm_config.speculative_config is not None:
        raise _unsupported(
            "speculative decoding gives a request several token rows per step, of which only the accepted ones "
            "become output: observation records and abort_when would count rejected draft tokens. Run steering "
            "without --speculative-config"
        )


def install(runner, model, steerer: Steerer) -> SlotRequests:
    """Wrap (on the instance) prepare_inputs and execute_model; call after load_model."""
    check_runner(runner)
    if getattr(runner, _INSTALLED_MARK, None) is not None:
        raise RuntimeError("steer_plugin: the V2 runner is hooked twice")
    requests = SlotRequests()
    processor = abort.active()
    if processor is not None:
        processor.plan_of = steerer.plan_of
    prepare_inputs, execute_model = runner.prepare_inputs, runner.execute_model
    batch: list = [None]  # the InputBatch of the step being run (abort_when maps its rows to slots)

    @functools.wraps(prepare_inputs)
    def prepare_inputs_and_steer(scheduler_output, *args, **kwargs):
        input_batch = prepare_inputs(scheduler_output, *args, **kwargs)
        batch[0] = input_batch
        requests.enter(scheduler_output.scheduled_new_reqs, input_batch)
        steerer.prepare_or_disarm(lambda: batch_view(input_batch, requests))
        return input_batch

    @functools.wraps(execute_model)
    def execute_model_and_observe(*args, **kwargs):
        try:
            result = execute_model(*args, **kwargs)
        except BaseException:
            steerer.disarm()
            raise
        hits = steerer.after_forward_safely()  # features of this step's observed tokens, outside the forward
        input_batch, batch[0] = batch[0], None
        if hits and input_batch is not None:
            slots = input_batch.idx_mapping_np[np.asarray(hits, dtype=np.int64)]
            if processor is None:
                logger.error(
                    "steer_plugin: abort_when fired but the AbortWhen logits processor is not loaded"
                )
            else:
                processor.arm(slots)
        return result

    runner.prepare_inputs = prepare_inputs_and_steer
    runner.execute_model = execute_model_and_observe
    setattr(runner, _INSTALLED_MARK, requests)
    logger.info("steer_plugin: hooked vLLM %s Model Runner V2 (%s)", _vllm_version(), type(runner).__name__)
    return requests


def self_test_step(runner):
    """One decode-shaped dummy forward of one token (V2's dummy batches zero input_ids and positions)."""

    def decode_one_token():
        runner._dummy_run(1, uniform_decode=True)

    return decode_one_token
