"""The Model Runner V2 adapter against vLLM's own V2 code, on CPU.

The runner is a real `vllm.v1.worker.gpu.model_runner.GPUModelRunner` whose CPU-side request bookkeeping runs for real:
`finish_requests`, `add_requests`, `update_requests`, `gather_batch_req_state` (the decode-first sort) and
`prepare_inputs` (which builds the step's `InputBatch`), on a real `RequestState`, `InputBuffers` and `LoraState`,
fed real `SchedulerOutput`/`NewRequestData`/`CachedRequestData`. What cannot run without a GPU is replaced, and only that:

- `GPUModelRunner.__init__` creates a CUDA stream (model_runner.py:229), so the instance is made with `__new__` and
  given the attributes those methods read;
- the three Triton kernels `prepare_inputs` launches (input ids, positions/seq_lens, logits indices: GPU tensors the
  adapter does not read) and `RequestState.apply_staged_writes` (a Triton kernel) are no-ops;
- `model_state` and `block_tables` exist only after load_model / initialize_kv_cache (model and KV cache): stubs;
- `UvaBuffer` is swapped for vLLM's own CPU version, as vLLM's CPU worker does (v1/worker/cpu/shm.py:98): the CPU
  platform reports UVA but cannot pin memory.
"""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest
import torch
import vllm
import vllm.v1.worker.cpu.buffer_utils as cpu_buffer_utils
import vllm.v1.worker.gpu.buffer_utils as gpu_buffer_utils
import vllm.v1.worker.gpu.model_runner as v2_model_runner
from vllm.config import ParallelConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.lora_utils import LoraState
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
from vllm.v1.worker.gpu.states import RequestState

from steer_adapters.vllm.worker import runner_v1
from steer_adapters.vllm.worker.runner_v2 import RequestInfo, SlotRequests, batch_view, install, is_v2_runner
from steer_plugin.request.wire import WIRE_KEY

MAX_REQS, MAX_TOKENS, MAX_MODEL_LEN = 8, 64, 256
CPU = torch.device("cpu")


# --- a V2 runner whose CPU bookkeeping is real ---------------------------------------------------------------


class _ModelState:
    """Stands in for init_model_state(...) (needs the loaded model): the default state's request hooks are no-ops."""

    num_new_sampled_tokens_per_step = 1

    def add_request(self, req_index, new_req_data):
        pass

    def remove_request(self, req_id):
        pass

    def apply_staged_writes(self):
        pass


@pytest.fixture
def v2_runner(monkeypatch):
    monkeypatch.setattr(gpu_buffer_utils, "UvaBuffer", cpu_buffer_utils.UvaBuffer)
    # Triton kernels: they write input_ids, positions, seq_lens and logits indices (GPU tensors the view never reads).
    monkeypatch.setattr(v2_model_runner, "prepare_prefill_inputs", lambda *a, **k: None)
    monkeypatch.setattr(v2_model_runner, "prepare_pos_seq_lens", lambda *a, **k: None)
    monkeypatch.setattr(
        v2_model_runner, "combine_sampled_and_draft_tokens", lambda *a, **k: torch.empty(0, dtype=torch.int64)
    )

    runner = GPUModelRunner.__new__(GPUModelRunner)
    runner.device = CPU
    runner.max_num_reqs = MAX_REQS
    runner.max_num_tokens = MAX_TOKENS
    runner.parallel_config = ParallelConfig()
    runner.speculator = None
    runner.vllm_config = types.SimpleNamespace(
        parallel_config=runner.parallel_config, speculative_config=None
    )
    runner.req_states = RequestState(MAX_REQS, MAX_MODEL_LEN, MAX_TOKENS, 0, 1000, CPU)
    runner.req_states.apply_staged_writes = lambda: (
        None
    )  # Triton (buffer_utils.StagedWriteTensor.apply_write)
    runner.input_buffers = InputBuffers(MAX_REQS, MAX_TOKENS, CPU)
    runner.lora_state = LoraState(max_num_reqs=MAX_REQS)
    runner.model_state = _ModelState()
    runner.block_tables = types.SimpleNamespace(append_block_ids=lambda *a, **k: None)
    runner.model_config = types.SimpleNamespace(rswa_window=None)
    runner.decode_query_len = 1
    runner.use_pp = False
    runner.is_last_pp_rank = False  # no sampler: it is built by load_model
    for name in (
        "pooling_runner",
        "pp_handler",
        "encoder_cache",
        "prompt_logprobs_worker",
        "adaptive_verification",
        "sampler",
        "pcp_manager",
        "fast_prefill",
        "kv_block_zeroer",
    ):
        setattr(runner, name, None)
    return runner


class RecordingSteerer:
    def __init__(self):
        self.views = []

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
def installed(v2_runner):
    steerer = RecordingSteerer()
    requests = install(v2_runner, None, steerer)
    return v2_runner, requests, steerer


# --- scheduler outputs ------------------------------------------------------------------------------------------


def new_req(req_id, prompt_len, wire=None, output_tokens=0, num_computed=0, extra=None):
    prompt = list(range(100, 100 + prompt_len))
    extra_args = dict(extra or {})
    if wire is not None:
        extra_args[WIRE_KEY] = wire
    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=prompt,
        mm_features=[],
        sampling_params=SamplingParams(max_tokens=32, extra_args=extra_args or None),
        pooling_params=None,
        block_ids=([],),
        num_computed_tokens=num_computed,
        lora_request=None,
        prefill_token_ids=prompt + list(range(500, 500 + output_tokens)),  # V2 gets prompt + generated tokens
    )


def sched(scheduled, new=(), cached=None, finished=(), preempted=None):
    """scheduled: [(req_id, num_tokens)] in the scheduler's dict order; cached: {req_id: num_computed_tokens}."""
    cached = cached or {}
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = list(new)
    out.scheduled_cached_reqs = CachedRequestData(
        req_ids=list(cached),
        resumed_req_ids=set(),
        new_token_ids=[],
        all_token_ids={},
        new_block_ids=[None] * len(cached),
        num_computed_tokens=list(cached.values()),
        num_output_tokens=[1] * len(cached),
    )
    out.num_scheduled_tokens = dict(scheduled)
    out.total_num_scheduled_tokens = sum(n for _, n in scheduled)
    out.finished_req_ids = set(finished)
    out.preempted_req_ids = set(preempted) if preempted is not None else None
    return out


def eager(num_tokens):
    return BatchExecutionDescriptor(cg_mode=CUDAGraphMode.NONE, num_tokens=num_tokens, num_reqs=None)


def execute(runner, out, desc=None):
    """The CPU half of GPUModelRunner.execute_model for one real step (model_runner.py:1733-1736, 1754, 1812)."""
    runner.finish_requests(out)
    runner.add_requests(out)
    runner.update_requests(out)
    batch_state, _ = runner.gather_batch_req_state(out, False)
    return runner.prepare_inputs(out, batch_state, desc or eager(out.total_num_scheduled_tokens), 0)


# A: steered, prompt 3. B: unsteered (another extra_arg only), prompt 2. C: steered, prompt 10, chunked prefill.
STEPS = [
    # 1: two full prefills.
    lambda: sched([("A", 3), ("B", 2)], new=[new_req("A", 3, "wA"), new_req("B", 2, extra={"x": 1})]),
    # 2: mixed: A and B decode, C prefills its first 4 of 10 prompt tokens; the scheduler lists C first.
    lambda: sched([("C", 4), ("A", 1), ("B", 1)], new=[new_req("C", 10, "wC")], cached={"A": 3, "B": 2}),
    # 3: mixed again: C's second chunk (6 tokens from position 4).
    lambda: sched([("C", 6), ("B", 1), ("A", 1)], cached={"A": 4, "B": 3, "C": 4}),
    # 4: pure decode.
    lambda: sched([("A", 1), ("B", 1), ("C", 1)], cached={"A": 5, "B": 4, "C": 10}),
    # 5: B finished.
    lambda: sched([("C", 1), ("A", 1)], cached={"A": 6, "C": 11}, finished={"B"}),
    # 6: A preempted.
    lambda: sched([("C", 1)], cached={"C": 12}, preempted={"A"}),
    # 7: A resumed: V2 gets it as a new request again, prompt + its 5 generated tokens (scheduler.py:1418-1420).
    lambda: sched([("C", 1), ("A", 8)], new=[new_req("A", 3, "wA", output_tokens=5)], cached={"C": 13}),
]


def play(runner, upto, last_desc=None):
    batch = None
    for i, make in enumerate(STEPS[:upto]):
        batch = execute(runner, make(), last_desc if i == upto - 1 else None)
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
    batch = play(runner, 1)
    assert isinstance(batch, InputBatch)
    (view,) = steerer.views
    assert view.req_ids == ["B", "A"]  # vLLM sorts equal-kind requests by token count
    assert view.query_start.tolist() == [0, 2, 5]
    assert rows(view) == [("B", 0), ("B", 1), ("A", 0), ("A", 1), ("A", 2)]
    assert view.num_prompt.tolist() == [2, 3]
    assert view.wires == [None, "wA"]


def test_mixed_step_decodes_first_then_chunked_prefill(installed):
    runner, requests, steerer = installed
    batch = play(runner, 2)
    view = steerer.views[-1]
    assert batch.req_ids == ["A", "B", "C"]  # C was scheduled first but V2 puts decodes first
    assert view.req_ids == ["A", "B", "C"]
    assert view.query_start.tolist() == [0, 1, 2, 6]
    assert view.num_computed.tolist() == [3, 2, 0]
    assert rows(view) == [("A", 3), ("B", 2), ("C", 0), ("C", 1), ("C", 2), ("C", 3)]
    assert view.num_prompt.tolist() == [3, 2, 10]
    assert view.wires == ["wA", None, "wC"]

    execute(runner, STEPS[2]())
    view = steerer.views[-1]
    assert view.req_ids == ["B", "A", "C"]
    assert rows(view) == [("B", 3), ("A", 4)] + [("C", p) for p in range(4, 10)]


def test_pure_decode_step_with_full_graph_request_padding(installed):
    runner, requests, steerer = installed
    # A FULL decode graph captured for 4 requests / 4 tokens serves this 3-request step.
    desc = BatchExecutionDescriptor(
        cg_mode=CUDAGraphMode.FULL, num_tokens=4, num_reqs=4, uniform_token_count=1, max_query_len=1
    )
    batch = play(runner, 4, last_desc=desc)
    assert batch.num_reqs == 3 and batch.num_reqs_after_padding == 4
    assert batch.query_start_loc_np.tolist() == [0, 1, 2, 3, 3]  # padded by vLLM (model_runner.py:1433, 1445)
    view = steerer.views[-1]
    assert view.req_ids == ["A", "B", "C"]
    assert view.query_start.tolist() == [0, 1, 2, 3]
    assert rows(view) == [("A", 5), ("B", 4), ("C", 10)]
    assert view.wires == ["wA", None, "wC"]
    assert len(steerer.views) == 4  # one prepare per forward


def test_finished_preempted_and_resumed_requests(installed):
    runner, requests, steerer = installed
    play(runner, 4)
    assert {i.req_id for i in requests.by_slot.values()} == {"A", "B", "C"}

    execute(runner, STEPS[4]())  # B finished
    view = steerer.views[-1]
    assert view.req_ids == ["C", "A"]
    assert rows(view) == [("C", 11), ("A", 6)]
    assert view.wires == ["wC", "wA"]

    execute(runner, STEPS[5]())  # A preempted: V2 frees its slot
    assert rows(steerer.views[-1]) == [("C", 12)]

    batch = execute(runner, STEPS[6]())  # A resumed, recomputed from position 0, maybe in another slot
    view = steerer.views[-1]
    assert view.req_ids == ["C", "A"]
    assert rows(view) == [("C", 13)] + [("A", p) for p in range(8)]
    assert batch.prefill_len_np.tolist() == [10, 8]  # V2's prefill length counts A's generated tokens ...
    assert view.num_prompt.tolist() == [10, 3]  # ... the view keeps the prompt length
    assert view.wires == ["wC", "wA"]
    slot_of_a = int(batch.idx_mapping_np[1])
    assert requests.by_slot[slot_of_a] == RequestInfo("A", 3, "wA")
    assert len(requests.by_slot) <= MAX_REQS  # one entry per slot: nothing to free when requests end


def test_a_request_that_never_entered_is_an_error(installed):
    """A request in the batch that this worker never saw enter (vLLM changed how requests reach the worker):
    prepare_or_disarm runs the step unsteered and says why, never steering with another request's plan."""
    runner, requests, steerer = installed
    out = STEPS[0]()
    runner.finish_requests(out)
    runner.add_requests(out)
    runner.update_requests(out)
    batch_state, _ = runner.gather_batch_req_state(out, False)
    out.scheduled_new_reqs = []  # as if vLLM no longer listed them there
    with pytest.raises(RuntimeError, match="never entered it through scheduled_new_reqs"):
        runner.prepare_inputs(out, batch_state, eager(5), 0)


def test_view_of_make_dummy_batch():
    """vLLM's own dummy builder: 7 tokens over 3 requests, the remainder on the last (input_batch.py:148-153)."""
    batch = InputBatch.make_dummy(3, 7, InputBuffers(MAX_REQS, MAX_TOKENS, CPU))
    requests = SlotRequests()
    requests.by_slot = {int(s): RequestInfo(r, 4, None) for r, s in zip(batch.req_ids, batch.idx_mapping_np)}
    view = batch_view(batch, requests)
    assert view.req_ids == batch.req_ids
    assert view.query_start.tolist() == [0, 2, 4, 7]
    assert view.num_computed.tolist() == [0, 0, 0]
    with pytest.raises(RuntimeError, match="never entered"):
        batch_view(batch, SlotRequests())


# --- install_v2 --------------------------------------------------------------------------------------------------


def test_install_wraps_the_instance_not_the_class(installed):
    runner, requests, steerer = installed
    for name in ("prepare_inputs", "execute_model"):
        assert name in vars(runner)
        assert getattr(GPUModelRunner, name).__qualname__ == f"GPUModelRunner.{name}"
    other = GPUModelRunner.__new__(GPUModelRunner)
    assert "prepare_inputs" not in vars(other)
    with pytest.raises(RuntimeError, match="twice"):
        install(runner, None, steerer)


def test_is_v2_runner():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPURunnerV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CPURunnerV1
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as GPURunnerV1

    assert is_v2_runner(GPUModelRunner.__new__(GPUModelRunner))
    assert is_v2_runner(CPURunnerV2.__new__(CPURunnerV2))
    assert not is_v2_runner(CPURunnerV1.__new__(CPURunnerV1))
    assert not is_v2_runner(GPURunnerV1.__new__(GPURunnerV1))


def test_install_refuses_a_v1_runner():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CPURunnerV1

    with pytest.raises(RuntimeError, match=rf"vLLM {vllm.__version__} .*not a Model Runner V2"):
        install(CPURunnerV1.__new__(CPURunnerV1), None, RecordingSteerer())


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
    v2_runner.vllm_config.speculative_config = types.SimpleNamespace(num_speculative_tokens=3)
    with pytest.raises(RuntimeError, match="speculative decoding"):
        install(v2_runner, None, RecordingSteerer())


# --- V1 and V2 agree on the same logical batch --------------------------------------------------------------------


def test_v1_view_matches_v2_view_for_the_mixed_step(installed):
    """Step 2 as Model Runner V1 holds it: persistent batch in arrival order, query_start_loc over that order."""
    from vllm.v1.utils import CpuGpuBuffer
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_input_batch import InputBatch as InputBatchV1

    runner, requests, steerer = installed
    play(runner, 2)
    v2 = steerer.views[-1]

    batch = InputBatchV1(
        max_num_reqs=MAX_REQS,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_TOKENS,
        device=CPU,
        vocab_size=1000,
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
    query_start_loc = CpuGpuBuffer(MAX_REQS + 1, dtype=torch.int32, device=CPU, pin_memory=False)
    n = batch.num_reqs
    # gpu_model_runner.py:2029-2030: cumulative scheduled tokens in the persistent batch's order.
    query_start_loc.np[1 : n + 1] = np.cumsum([scheduled[r] for r in batch.req_ids[:n]])
    v1 = runner_v1.batch_view(
        types.SimpleNamespace(input_batch=batch, query_start_loc=query_start_loc, requests=states)
    )

    assert v1.req_ids == ["A", "B", "C"]
    assert Counter(rows(v1)) == Counter(rows(v2))

    def per_request(view):
        qs = view.query_start
        return {
            r: (
                int(qs[i + 1] - qs[i]),
                int(view.num_computed[i]),
                int(view.num_prompt[i]),
                view.wires[i],
            )
            for i, r in enumerate(view.req_ids)
        }

    assert (
        per_request(v1)
        == per_request(v2)
        == {
            "A": (1, 3, 3, "wA"),
            "B": (1, 2, 2, None),
            "C": (4, 0, 10, "wC"),
        }
    )
