"""SchedulerOutputs as vLLM's scheduler sends them to Model Runner V2, built from a script.

The script keeps what the real scheduler keeps per request (prompt, generated tokens, computed tokens) and turns each
step's plan (which requests run how many tokens; which finished, were aborted or preempted; draft tokens) into real
`SchedulerOutput` / `NewRequestData` / `CachedRequestData` objects. What V2 receives, per vLLM's scheduler:

- a new request, and a preempted one when it resumes, comes as `NewRequestData` whose `prefill_token_ids` are the
  prompt plus the tokens generated so far (0.34.0 v1/core/sched/scheduler.py:1619-1626, 1716-1721; 0.32.0
  :1418-1420 and 0.33.0 :1642-1644 move resumed requests into the new ones under V2);
- a running request comes in `CachedRequestData` with its `num_computed_tokens` (scheduler.py:1979-2025); V2 reads
  no token ids from it without pipeline parallelism;
- finished and aborted requests are both in `finished_req_ids`; preempted ones in `preempted_req_ids`;
- a decode with drafts has `scheduled_spec_decode_tokens[req]` and 1 + len(drafts) scheduled tokens.

Tokens the model samples come back with `commit(...)`; without it (no kernels, no sampler) each request is taken to
have sampled `FAKE_TOKEN_BASE + n` for its n-th output, so a resumed request's prefill is still well defined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from steer_plugin.request.wire import WIRE_KEY

PROMPT_TOKEN_BASE = 100
FAKE_TOKEN_BASE = 500
# CachedRequestData fields that exist only in some versions (0.32/0.33: resumed_req_ids, all_token_ids).
_CACHED_DEFAULTS: dict[str, Any] = {"resumed_req_ids": set, "all_token_ids": dict, "new_token_ids": list}


def sampling_params(
    wire: str | None = None,
    extra: Mapping[str, Any] | None = None,
    max_tokens: int = 32,
    eos_token_id: int | None = None,
    **kwargs: Any,
) -> SamplingParams:
    """SamplingParams whose extra_args carry the steering wire form (and any other extra args); `eos_token_id` is
    set the way the engine's input processing sets it (SamplingParams.update_from_generation_config)."""
    extra_args = dict(extra or {})
    if wire is not None:
        extra_args[WIRE_KEY] = wire
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra_args or None, **kwargs)
    if eos_token_id is not None:
        params.update_from_generation_config({}, eos_token_id)
    return params


@dataclasses.dataclass
class ScriptRequest:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # as the scheduler counts it after the last scheduled step
    in_runner: bool = False  # the runner holds its state (added and not since freed)
    admitted_len: int = 0  # prefill length the runner got when it (re)admitted the request
    pending: int = 0  # tokens the last step will sample for it (0 mid-prefill)
    drafts: int = 0  # draft tokens scheduled in the last step

    @property
    def prefill(self) -> list[int]:
        return self.prompt + self.output

    @property
    def decoding(self) -> bool:
        """Past the prefill the runner was given: its next step is a decode (which may carry drafts)."""
        return self.in_runner and self.num_computed >= self.admitted_len


class ScriptedScheduler:
    def __init__(self) -> None:
        self.requests: dict[str, ScriptRequest] = {}

    def add(
        self,
        req_id: str,
        prompt_len: int | None = None,
        *,
        prompt: Sequence[int] | None = None,
        params: SamplingParams | None = None,
        **params_kwargs: Any,
    ) -> ScriptRequest:
        """A request arriving (it reaches the runner when first scheduled)."""
        if (prompt is None) == (prompt_len is None):
            raise ValueError("give prompt_len or prompt")
        tokens = (
            list(prompt)
            if prompt is not None
            else list(range(PROMPT_TOKEN_BASE, PROMPT_TOKEN_BASE + prompt_len))
        )
        req = ScriptRequest(req_id, tokens, params or sampling_params(**params_kwargs))
        self.requests[req_id] = req
        return req

    def step(
        self,
        scheduled: Sequence[tuple[str, int]],
        *,
        finished: Iterable[str] = (),
        preempted: Iterable[str] = (),
        drafts: Mapping[str, Sequence[int]] | None = None,
    ) -> SchedulerOutput:
        """One step: `scheduled` is [(req_id, num_tokens)] in the scheduler's order (running first, then new);
        `finished` left since the last step (finished or aborted); `preempted` were preempted (freed, to resume
        later as new); `drafts` the draft tokens scheduled with a decode (counted in its num_tokens)."""
        self._settle()
        drafts = dict(drafts or {})
        finished, preempted = set(finished), set(preempted)
        for req_id in finished:
            self.requests.pop(req_id)
        for req_id in preempted:
            req = self.requests[req_id]
            req.in_runner, req.num_computed = False, 0
        new: list[NewRequestData] = []
        cached: list[ScriptRequest] = []
        for req_id, _ in scheduled:
            req = self.requests[req_id]
            if not req.in_runner:
                new.append(self._new_request_data(req))
                req.in_runner, req.admitted_len = True, len(req.prefill)
            else:
                cached.append(req)
        out = SchedulerOutput.make_empty()
        out.scheduled_new_reqs = new
        out.scheduled_cached_reqs = _cached_request_data(cached)
        out.num_scheduled_tokens = dict(scheduled)
        out.total_num_scheduled_tokens = sum(n for _, n in scheduled)
        out.scheduled_spec_decode_tokens = {r: list(d) for r, d in drafts.items()}
        out.finished_req_ids = finished
        out.preempted_req_ids = preempted or None
        for req_id, num_tokens in scheduled:
            req = self.requests[req_id]
            req.drafts = len(drafts.get(req_id, ()))
            req.num_computed += num_tokens
            # A request samples once it has computed its whole prefill (scheduler.py's update_from_output).
            req.pending = 1 + req.drafts if req.num_computed >= len(req.prefill) else 0
        return out

    def commit(self, sampled: Mapping[str, Sequence[int]]) -> None:
        """The tokens each request sampled in the last step (accepted drafts and the bonus token)."""
        for req_id, tokens in sampled.items():
            req = self.requests[req_id]
            if req.pending == 0:
                continue
            # Rejected drafts were computed for nothing: the scheduler takes them back (update_from_output).
            req.num_computed -= req.pending - len(tokens)
            req.output.extend(int(t) for t in tokens)
            req.pending = 0

    def _settle(self) -> None:
        """Requests of the last step that nobody committed sampled fake tokens (all drafts accepted)."""
        for req in self.requests.values():
            if req.pending:
                start = FAKE_TOKEN_BASE + len(req.output)
                req.output.extend(range(start, start + req.pending))
                req.pending = 0

    @staticmethod
    def _new_request_data(req: ScriptRequest) -> NewRequestData:
        fields = {
            "req_id": req.req_id,
            "prompt_token_ids": list(req.prompt),
            "mm_features": [],
            "sampling_params": req.params,
            "pooling_params": None,
            "block_ids": ([],),
            "num_computed_tokens": req.num_computed,
            "lora_request": None,
            "prefill_token_ids": req.prefill,  # V2 reads prompt + generated tokens from here
        }
        return NewRequestData(**fields)


def _cached_request_data(reqs: Sequence[ScriptRequest]) -> CachedRequestData:
    present = {f.name for f in dataclasses.fields(CachedRequestData)}
    fields: dict[str, Any] = {
        "req_ids": [r.req_id for r in reqs],
        "new_block_ids": [None] * len(reqs),
        "num_computed_tokens": [r.num_computed for r in reqs],
        "num_output_tokens": [len(r.output) for r in reqs],
    }
    # 0.32.0/0.33.0 also have resumed_req_ids and all_token_ids (output.py); 0.34.0 dropped both (output.py:139).
    fields.update({name: make() for name, make in _CACHED_DEFAULTS.items() if name in present})
    return CachedRequestData(**fields)
