"""The V2 harness (tests/adapters/runner_v2) reproduces vLLM's Model Runner V2 on scripted and random batches,
without our glue: the rows, slots and order of each step's InputBatch, preemption and resume, FULL-graph request
padding, speculative-decoding rows, finished and aborted requests.

What runs for real, per vLLM (this module runs in-process on the installed vLLM and, through
test_v2_side_versions.py, under each side venv's):
- every version: GPUModelRunner's finish_requests, free_states, add_requests, update_requests,
  gather_batch_req_state (decode-first sort), prepare_inputs, on vLLM's RequestState, InputBuffers, LoraState,
  DraftTokensHandler, fed real SchedulerOutput / NewRequestData / CachedRequestData;
- 0.33.0 and 0.34.0 (side venvs, Triton interpreter): also every kernel on the path (input ids, positions,
  seq_lens, logits indices, expanded idx mapping, staged writes, post-sampling update) and the sampling side
  (Sampler, RejectionSampler), so input ids and positions are vLLM's and the tests below check them;
- 0.32.0 in the shared venv: kernel launches are no-ops and there is no sampler; the kernel-dependent tests skip
  there (and only there: the side-venv runs fail on any skip).
Replaced everywhere: the model and KV cache (model_state, block_tables, the drafter: runner_v2/runner.py), CUDA
streams and events.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.adapters.runner_v2 import vllm_env
from tests.adapters.runner_v2.runner import RunnerSpec, build_runner
from tests.adapters.runner_v2.scheduler import ScriptedScheduler
from tests.adapters.runner_v2.step import (
    execute_cpu_half,
    full_graph,
    one_hot_logits,
    sample,
    write_drafts,
)

VOCAB = 64


def expected_order(scheduled: list[tuple[str, int]], drafts: dict, decode_query_len: int) -> list[str]:
    """V2's batch order (model_runner.py sort_batch_req_ids): verifying decodes, then decodes, then the rest by
    token count, ties in the scheduler's order."""
    key = {r: (not drafts.get(r), n != decode_query_len, n) for r, n in scheduled}
    return sorted((r for r, _ in scheduled), key=key.__getitem__)


def check_rows(runner, script_before: dict[str, int], scheduled, drafts, batch) -> None:
    """The CPU-side facts of a step's InputBatch, from the script alone."""
    order = expected_order(scheduled, drafts, runner.decode_query_len)
    n = batch.num_reqs
    assert batch.req_ids[:n] == order
    counts = dict(scheduled)
    assert batch.query_start_loc_np[: n + 1].tolist() == [0, *np.cumsum([counts[r] for r in order]).tolist()]
    assert batch.num_computed_tokens_np[:n].tolist() == [script_before[r] for r in order]
    slots = [runner.req_states.req_id_to_index[r] for r in order]
    assert batch.idx_mapping_np[:n].tolist() == slots
    assert len(set(slots)) == n  # no two live requests share a slot


def check_kernel_outputs(script: ScriptedScheduler, before: dict[str, int], drafts, batch) -> None:
    """What the kernels wrote: each row's position and token, and one logits row per sampled token."""
    positions, input_ids = batch.positions.tolist(), batch.input_ids.tolist()
    qs = batch.query_start_loc_np
    logits_rows = []
    for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        req, start, end = script.requests[req_id], int(qs[i]), int(qs[i + 1])
        draft = list(drafts.get(req_id, ()))
        tokens = req.prefill + draft  # the last sampled token is the last of prefill when decoding
        for row in range(start, end):
            pos = before[req_id] + row - start
            assert positions[row] == pos, (req_id, row)
            assert input_ids[row] == tokens[pos], (req_id, row, pos)
        # One logits row per request, one per draft more (a mid-prefill chunk's row is sampled and dropped).
        logits_rows += list(range(end - len(draft) - 1, end))
    assert batch.logits_indices.tolist() == logits_rows


# --- scripted steps -----------------------------------------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch):
    return build_runner(monkeypatch, RunnerSpec(vocab_size=VOCAB))


def run_step(runner, script, scheduled, desc=None, **kwargs):
    before = {r: script.requests[r].num_computed for r, _ in scheduled}
    preempted = set(kwargs.get("preempted", ()))
    before.update({r: 0 for r in preempted if r in before})
    out = script.step(scheduled, **kwargs)
    batch = execute_cpu_half(runner, out, desc)
    return before, out, batch


def test_prefill_then_mixed_step_decodes_first(runner):
    script = ScriptedScheduler()
    script.add("A", 3)
    script.add("B", 2)
    script.add("C", 10)
    before, _, batch = run_step(runner, script, [("A", 3), ("B", 2)])
    assert batch.req_ids == ["B", "A"]  # two prefills: fewer tokens first
    check_rows(runner, before, [("A", 3), ("B", 2)], {}, batch)
    if vllm_env.KERNELS_RUN:  # vLLM's sampler moves the device-side state on, as after a real forward
        script.commit(sample(runner, batch, one_hot_logits(VOCAB, [8, 7])).tokens)
    scheduled = [("C", 4), ("A", 1), ("B", 1)]
    before, _, batch = run_step(runner, script, scheduled)
    assert batch.req_ids == ["A", "B", "C"]  # C was scheduled first; the decodes lead
    check_rows(runner, before, scheduled, {}, batch)
    assert batch.is_prefilling_np.tolist() == [False, False, True]
    assert batch.prefill_len_np.tolist() == [3, 2, 10]


def test_finished_aborted_and_preempted_requests_free_their_slots(runner):
    script = ScriptedScheduler()
    for req_id, n in (("A", 3), ("B", 2), ("C", 4)):
        script.add(req_id, n)
    run_step(runner, script, [("A", 3), ("B", 2), ("C", 4)])
    slots = dict(runner.req_states.req_id_to_index)
    # B finished, C aborted: both arrive as finished_req_ids; A preempted: freed as well (finish_requests).
    script.add("D", 5)
    before, _, batch = run_step(runner, script, [("D", 5)], finished={"B", "C"}, preempted={"A"})
    assert set(runner.req_states.req_id_to_index) == {"D"}
    assert runner.req_states.req_id_to_index["D"] in slots.values()  # a freed slot, reused
    check_rows(runner, before, [("D", 5)], {}, batch)
    # A resumes: a new request again, recomputed from 0 with its generated token in the prefill.
    before, out, batch = run_step(runner, script, [("D", 1), ("A", 4)])
    (resumed,) = out.scheduled_new_reqs
    assert resumed.req_id == "A" and resumed.prefill_token_ids == [100, 101, 102, 500]
    assert batch.req_ids == ["D", "A"]
    assert batch.prefill_len_np.tolist() == [5, 4]
    check_rows(runner, before, [("D", 1), ("A", 4)], {}, batch)


def test_full_graph_request_padding(runner):
    script = ScriptedScheduler()
    for req_id in "ABC":
        script.add(req_id, 2)
    run_step(runner, script, [("A", 2), ("B", 2), ("C", 2)])
    before, _, batch = run_step(runner, script, [("A", 1), ("B", 1), ("C", 1)], desc=full_graph(num_reqs=4))
    assert batch.num_reqs == 3 and batch.num_reqs_after_padding == 4
    assert batch.num_tokens == 3 and batch.num_tokens_after_padding == 4
    # The padding request owns no rows: query_start_loc repeats the total (prepare_inputs' FULL padding).
    assert batch.query_start_loc_np.tolist() == [0, 1, 2, 3, 3]
    check_rows(runner, before, [("A", 1), ("B", 1), ("C", 1)], {}, batch)


@pytest.fixture
def spec_runner(monkeypatch):
    return build_runner(monkeypatch, RunnerSpec(vocab_size=VOCAB, num_speculative_steps=2))


def test_speculative_decoding_rows(spec_runner):
    runner, script = spec_runner, ScriptedScheduler()
    script.add("A", 3)
    script.add("B", 2)
    script.add("C", 6)
    run_step(runner, script, [("A", 3), ("B", 2)])
    drafts = {"A": [20, 21]}
    scheduled = [("C", 6), ("B", 1), ("A", 3)]
    before, out, batch = run_step(runner, script, scheduled, drafts=drafts)
    assert runner.decode_query_len == 3
    assert batch.req_ids == ["A", "B", "C"]  # the verifying request first, then the plain decode
    check_rows(runner, before, scheduled, drafts, batch)
    assert batch.num_draft_tokens == 2
    assert batch.num_draft_tokens_per_req.tolist() == [2, 0, 0]
    assert batch.cu_num_logits_np.tolist() == [0, 3, 4, 5]  # A: 2 drafts + 1 bonus row; B, C: one each


# --- with vLLM's kernels and sampler (side venvs) -------------------------------------------------------------------


def test_kernels_write_positions_and_tokens_of_a_scripted_run(runner):
    vllm_env.require_kernels("positions and input ids")
    script = ScriptedScheduler()
    script.add("A", 3)
    script.add("B", 2)
    script.add("C", 10)
    steps = [
        dict(scheduled=[("A", 3), ("B", 2)]),
        dict(scheduled=[("C", 4), ("A", 1), ("B", 1)]),
        dict(scheduled=[("C", 6), ("B", 1), ("A", 1)]),
        dict(scheduled=[("A", 1), ("B", 1), ("C", 1)]),
        dict(scheduled=[("C", 1), ("A", 1)], finished={"B"}),
        dict(scheduled=[("C", 1)], preempted={"A"}),
        dict(scheduled=[("C", 1), ("A", 7)]),
    ]
    for n, step in enumerate(steps):
        before, out, batch = run_step(runner, script, **step)
        check_rows(runner, before, step["scheduled"], {}, batch)
        check_kernel_outputs(script, before, {}, batch)
        wanted = [10 + n] * len(batch.logits_indices)
        got = sample(runner, batch, one_hot_logits(VOCAB, wanted)).tokens
        # what the logits make sure is what vLLM samples, for every request past its prefill
        assert got == {r: ([10 + n] if script.requests[r].pending else []) for r in got}
        script.commit(got)
    # The resumed A was recomputed from its prompt and the 5 tokens it had sampled before (steps 1-5).
    assert out.scheduled_new_reqs[0].prefill_token_ids == [100, 101, 102, 10, 11, 12, 13, 14]


def test_full_graph_padding_rows_have_no_sequence_with_kernels(runner):
    vllm_env.require_kernels("the padded seq_lens")
    script = ScriptedScheduler()
    for req_id in "ABC":
        script.add(req_id, 2)
    _, _, batch = run_step(runner, script, [("A", 2), ("B", 2), ("C", 2)])
    # sampling's post-update advances the device-side computed counts the next step's kernels read
    script.commit(sample(runner, batch, one_hot_logits(VOCAB, [1, 2, 3])).tokens)
    _, _, batch = run_step(runner, script, [("A", 1), ("B", 1), ("C", 1)], desc=full_graph(num_reqs=4))
    assert batch.seq_lens.tolist() == [3, 3, 3, 0]  # the padding request: no sequence
    assert batch.seq_lens_cpu_upper_bound.tolist() == [3, 3, 3, 0]


def test_speculative_rows_with_kernels(spec_runner):
    vllm_env.require_kernels("draft rows")
    runner, script = spec_runner, ScriptedScheduler()
    script.add("A", 3)
    script.add("B", 2)
    _, _, batch = run_step(runner, script, [("A", 3), ("B", 2)])
    script.commit(sample(runner, batch, one_hot_logits(VOCAB, [8, 7])).tokens)
    drafts = {"A": [20, 21], "B": [30, 31]}
    write_drafts(runner, drafts)
    scheduled = [("A", 3), ("B", 3)]
    before, _, batch = run_step(runner, script, scheduled, drafts=drafts)
    check_kernel_outputs(script, before, drafts, batch)
    slot = runner.req_states.req_id_to_index
    assert batch.expanded_idx_mapping.tolist() == [slot["A"]] * 3 + [slot["B"]] * 3
    assert batch.expanded_local_pos.tolist() == [0, 1, 2, 0, 1, 2]
    # A's drafts are both right and its bonus token is 9; B's first draft is wrong (40 instead of 30).
    got = sample(runner, batch, one_hot_logits(VOCAB, [20, 21, 9, 40, 1, 2])).tokens
    assert got == {"A": [20, 21, 9], "B": [40]}
    script.commit(got)
    assert runner.req_states.num_computed_tokens.gpu[[slot["A"], slot["B"]]].tolist() == [6, 3]
    assert [script.requests[r].num_computed for r in "AB"] == [6, 3]


# --- random batches -------------------------------------------------------------------------------------------------


@dataclass
class RandomPolicy:
    """A scheduler-like policy: finish or abort some, preempt some, decode the running, chunk prefills, admit."""

    rng: random.Random
    max_reqs: int
    budget: int
    spec_steps: int = 0
    next_id: int = 0
    waiting: list[str] = field(default_factory=list)

    def plan(self, script: ScriptedScheduler) -> dict:
        running = [r for r, q in script.requests.items() if q.in_runner]
        finished = {r for r in running if self.rng.random() < 0.15}
        running = [r for r in running if r not in finished]
        preempted = {r for r in running if self.rng.random() < 0.08}
        running = [r for r in running if r not in preempted]
        self.waiting += sorted(preempted)
        while len(self.waiting) < 3:
            req_id = f"r{self.next_id}"
            self.next_id += 1
            script.add(req_id, self.rng.randint(1, 12))
            self.waiting.append(req_id)
        scheduled, drafts, budget = [], {}, self.budget
        for req_id in running:
            req = script.requests[req_id]
            if not req.decoding:  # mid-prefill: its next chunk
                n = min(req.admitted_len - req.num_computed, self.rng.randint(1, 8), budget)
            else:
                n = min(1 + (self.rng.randint(0, self.spec_steps) if self.spec_steps else 0), budget)
                if n > 1:
                    drafts[req_id] = [self.rng.randrange(VOCAB) for _ in range(n - 1)]
            if n > 0:
                scheduled.append((req_id, n))
                budget -= n
        while (
            self.waiting and len(running) + len([r for r, _ in scheduled if r not in running]) < self.max_reqs
        ):
            req_id = self.waiting[0]
            n = min(len(script.requests[req_id].prefill), self.rng.randint(1, 8), budget)
            if n == 0:
                break
            self.waiting.pop(0)
            scheduled.append((req_id, n))
            budget -= n
        self.rng.shuffle(scheduled)  # V2 must not depend on the scheduler's order beyond ties
        return dict(scheduled=scheduled, finished=finished, preempted=preempted, drafts=drafts)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spec_steps", [0, 2])
def test_random_batches(monkeypatch, seed, spec_steps):
    runner = build_runner(monkeypatch, RunnerSpec(vocab_size=VOCAB, num_speculative_steps=spec_steps))
    script, policy = (
        ScriptedScheduler(),
        RandomPolicy(random.Random(seed), max_reqs=6, budget=24, spec_steps=spec_steps),
    )
    rng = random.Random(1000 + seed)
    for _ in range(12):
        plan = policy.plan(script)
        if not plan["scheduled"]:
            continue
        write_drafts(runner, plan["drafts"])  # what the last step's drafter proposed
        before, _, batch = run_step(runner, script, **plan)
        check_rows(runner, before, plan["scheduled"], plan["drafts"], batch)
        if not vllm_env.KERNELS_RUN:
            continue
        check_kernel_outputs(script, before, plan["drafts"], batch)
        rows = len(batch.logits_indices)
        got = sample(runner, batch, one_hot_logits(VOCAB, [rng.randrange(VOCAB) for _ in range(rows)])).tokens
        assert {r for r, t in got.items() if t} == {r for r in got if script.requests[r].pending}
        script.commit(got)
        counts = runner.req_states.num_computed_tokens.gpu
        for req_id, req in script.requests.items():
            if req.in_runner:
                assert int(counts[runner.req_states.req_id_to_index[req_id]]) == req.num_computed, req_id
