"""Every vLLM internal the adapter touches, as data (engine_core.py, worker/install.py, worker/runner_v1.py,
worker/runner_v2.py, api/engine.py, api/serve.py).

Each entry names a module, a class or function in it, what the glue does with it and which glue function does
it (`used_by`). `python -m tools.check_internals` verifies the list against the installed vLLM
(import + inspect) and, with `--pinned`, against the source of the CUDA `vllm` wheel named in
requirements/vllm-versions.txt (ast, no import): a vLLM upgrade that moves any of them fails there, naming what
moved, instead of in a worker at start-up. tests/adapters/test_vllm_internals.py runs both, and checks that every
`vllm` import in the glue is listed here.

Kinds:
- `module`: importable (`runnable`: also run as `python -m`, so it has a `__main__` block);
- `class`, `function`;
- `method` / `classmethod` / `property`: defined on the class or a vLLM base class; `leading` are the parameters
  the glue passes by position (names and order, after self/cls), `keywords` those it passes by name, and `exact`
  says the glue *replaces* the callable with a wrapper of exactly the `leading` signature (so a parameter gained
  is a break too: vLLM's callers would pass it to the wrapper);
- `attribute`: read on instances: a class attribute, dataclass/pydantic/msgspec field, property, or `self.NAME =`
  in one of the class's methods (`value_prefix`: one such assignment's value starts with it, i.e. its type);
- `key`: a key of a module-level dict literal (`name`: the dict);
- `text`: the source of `name` (or of the module) contains `key` verbatim (an assignment the glue reads through
  another object).

`also_in`: where the same internal lives in another checked version, for one the glue reaches only through
vLLM (a CLI flag's dataclass); the check passes when either module has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

Kind = Literal["module", "class", "function", "method", "classmethod", "property", "attribute", "key", "text"]


@dataclass(frozen=True)
class Internal:
    module: str
    name: str  # "" (the module itself), "Class", "function", "Class.member", or the dict of a `key`
    kind: Kind
    used_by: str  # the glue function(s) that rely on it: "engine_core.patch_prefix_cache"
    leading: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    exact: bool = False
    returns_pair: bool = False  # every `return` of the function returns a 2-tuple
    value_prefix: str = ""
    key: str = ""
    runnable: bool = False
    also_in: tuple[
        str, ...
    ] = ()  # the module it had in another checked version (the glue does not import it)

    @property
    def path(self) -> str:
        """`module.Class.member`, `module.dict[key]` or `module` (what a failure message names)."""
        where = f"{self.module}.{self.name}" if self.name else self.module
        return f"{where}[{self.key!r}]" if self.kind == "key" else where


def _attrs(module: str, cls: str, names: tuple[str, ...], used_by: str, **kw) -> tuple[Internal, ...]:
    return tuple(Internal(module, f"{cls}.{n}", "attribute", used_by, **kw) for n in names)


class Architecture(NamedTuple):
    """A model the glue steers: `model.model.layers[i]` are `layer` modules whose forward takes and returns
    (hidden_states, residual); the op is a forward hook on them (install.decoder_layers, install._steer_hook)."""

    name: str  # the HF architecture (registry key)
    module: str
    causal_lm: str
    model: str
    layer: str


ARCHITECTURES = (
    Architecture("LlamaForCausalLM", "vllm.model_executor.models.llama", "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer"),
    Architecture("MistralForCausalLM", "vllm.model_executor.models.mistral", "MistralForCausalLM", "MistralModel", "MistralDecoderLayer"),
    Architecture("Qwen2ForCausalLM", "vllm.model_executor.models.qwen2", "Qwen2ForCausalLM", "Qwen2Model", "Qwen2DecoderLayer"),
    Architecture("Qwen3ForCausalLM", "vllm.model_executor.models.qwen3", "Qwen3ForCausalLM", "Qwen3Model", "Qwen3DecoderLayer"),
    Architecture("Qwen3MoeForCausalLM", "vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeModel", "Qwen3MoeDecoderLayer"),
    Architecture("Gemma2ForCausalLM", "vllm.model_executor.models.gemma2", "Gemma2ForCausalLM", "Gemma2Model", "Gemma2DecoderLayer"),
    Architecture("Gemma3ForCausalLM", "vllm.model_executor.models.gemma3", "Gemma3ForCausalLM", "Gemma3Model", "Gemma3DecoderLayer"),
)  # fmt: skip


def _architecture(a: Architecture) -> tuple[Internal, ...]:
    use = "install.decoder_layers, install._steer_hook, install.install_steerer"
    return (
        Internal("vllm.model_executor.models.registry", "_TEXT_GENERATION_MODELS", "key", use, key=a.name),
        Internal(a.module, f"{a.causal_lm}.model", "attribute", use),
        Internal(a.module, f"{a.causal_lm}.compute_logits", "method", "runner_v1._wrap_compute_logits"),
        *_attrs(a.module, a.model, ("layers", "start_layer", "end_layer"), use),
        Internal(
            a.module,
            f"{a.layer}.forward",
            "method",
            use,
            leading=("positions", "hidden_states", "residual"),
            returns_pair=True,
        ),
    )


# --- the list ----------------------------------------------------------------------------------------------------

V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
V1_BATCH = "vllm.v1.worker.gpu_input_batch"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
V2_BATCH = "vllm.v1.worker.gpu.input_batch"
SCHED_OUTPUT = "vllm.v1.core.sched.output"

# Model Runner V2: what runner_v2.install_v2 wraps and reads (runner_v2 imports these names).
V2_RUNNER_METHODS = ("add_requests", "finish_requests", "prepare_inputs")
V2_INPUT_BATCH_FIELDS = ("req_ids", "num_reqs", "query_start_loc_np", "num_computed_tokens_np")
V2_NEW_REQUEST_ATTRS = ("req_id", "sampling_params", "prompt_len")
V2_SCHEDULER_OUTPUT_FIELDS = ("scheduled_new_reqs", "finished_req_ids", "preempted_req_ids")

INTERNALS: tuple[Internal, ...] = (
    # prefix-cache isolation (engine_core.patch_prefix_cache)
    Internal(
        "vllm.v1.core.kv_cache_utils",
        "generate_block_hash_extra_keys",
        "function",
        "engine_core.patch_prefix_cache",
        leading=("request", "start_token_idx", "end_token_idx", "start_mm_idx"),
        exact=True,
    ),
    Internal(
        "vllm.v1.request",
        "Request.from_engine_core_request",
        "classmethod",
        "engine_core.patch_prefix_cache",
        leading=("request", "block_hasher"),
        exact=True,
    ),
    Internal("vllm.v1.request", "Request.__init__", "method", "engine_core.patch_prefix_cache", keywords=("block_hasher",)),
    *_attrs("vllm.v1.request", "Request", ("num_prompt_tokens", "skip_reading_prefix_cache"), "engine_core.patch_prefix_cache"),
    Internal("vllm.v1.engine", "EngineCoreRequest.sampling_params", "attribute", "engine_core.patch_prefix_cache"),
    Internal("vllm.sampling_params", "SamplingParams.extra_args", "attribute", "engine_core.patch_prefix_cache, runner_v1._wire"),
    Internal("vllm.sampling_params", "SamplingParams.eos_token_id", "property", "runner_v1.batch_view_v1"),
    # compile cache and configuration (install.patch_compile_cache_key, install.install_steerer)
    Internal("vllm.config", "VllmConfig.compute_hash", "method", "install.patch_compile_cache_key"),
    *_attrs(
        "vllm.config",
        "VllmConfig",
        ("additional_config", "parallel_config", "model_config", "scheduler_config", "compilation_config"),
        "install.patch_compile_cache_key, install.install_steerer",
    ),
    Internal("vllm.config", "ParallelConfig.use_ubatching", "property", "install.refuse_unsupported_modes"),
    Internal("vllm.config", "ParallelConfig.prefill_context_parallel_size", "attribute", "runner_v2._check_runner"),
    Internal("vllm.config", "ParallelConfig._api_process_count", "attribute", "engine.EngineWorkers.api_process_count"),
    Internal("vllm.config", "ParallelConfig.worker_extension_cls", "attribute", "engine.EngineWorkers.have_extension, install.install_steerer"),
    *_attrs("vllm.config", "ModelConfig", ("hf_text_config", "dtype"), "install.install_steerer, engine.model_shape"),
    Internal("vllm.config", "SchedulerConfig.max_num_seqs", "attribute", "install.install_steerer"),
    Internal("vllm.config", "CompilationConfig.max_cudagraph_capture_size", "attribute", "install._max_tokens"),
    Internal("vllm.distributed.parallel_state", "get_pp_group", "function", "install._parallel_ranks"),
    Internal("vllm.distributed.parallel_state", "get_tp_group", "function", "install._parallel_ranks"),
    Internal("vllm.distributed.parallel_state", "GroupCoordinator.rank_in_group", "attribute", "install._parallel_ranks"),
    # workers (install.patch_workers)
    Internal("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_device", "method", "install.patch_workers", exact=True),
    Internal("vllm.v1.worker.worker_base", "WorkerWrapperBase.worker", "attribute", "install.patch_workers"),
    Internal("vllm.v1.worker.gpu_worker", "Worker.load_model", "method", "install.patch_workers"),
    Internal("vllm.v1.worker.gpu_worker", "Worker.compile_or_warm_up_model", "method", "install.patch_workers"),
    *_attrs("vllm.v1.worker.gpu_worker", "Worker", ("model_runner", "vllm_config"), "install.install_steerer"),
    Internal("vllm.v1.worker.cpu_worker", "CPUWorker", "class", "install.patch_workers (the CPU build's worker)"),
    # the worker extension (--worker-extension-cls): vLLM appends it to the worker class's bases, so its methods
    # run with the worker as `self`; collective_rpc finds them by name through the wrapper's __getattr__
    Internal(
        "vllm.v1.worker.worker_base",
        "",
        "text",
        "extension.SteerWorkerExtension",
        key="worker_class.__bases__ = worker_class.__bases__ + (",
    ),
    Internal("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__", "method", "engine.EngineWorkers.stats, engine.EngineWorkers.load", leading=("attr",)),
    Internal("vllm.envs", "environment_variables", "key", "runner_v1.select_model_runner", key="VLLM_USE_V2_MODEL_RUNNER"),
    Internal("vllm.envs", "environment_variables", "key", "launcher.main", key="VLLM_CPU_KVCACHE_SPACE"),
    Internal("vllm.envs", "environment_variables", "key", "launcher.main", key="VLLM_CPU_NUM_OF_RESERVED_CPU"),
    # Model Runner V1 (install.install_steerer, runner_v1.batch_view_v1, install.run_self_test)
    Internal(V1_RUNNER, "GPUModelRunner.get_model", "method", "install.install_steerer"),
    Internal(V1_RUNNER, "GPUModelRunner._model_forward", "method", "runner_v1._wrap_model_forward"),
    Internal(
        V1_RUNNER,
        "GPUModelRunner._dummy_run",
        "method",
        "install.run_self_test",
        leading=("num_tokens",),
        keywords=("uniform_decode",),
    ),
    *_attrs(V1_RUNNER, "GPUModelRunner", ("input_batch", "requests", "max_num_tokens", "device", "vllm_config"), "runner_v1.batch_view_v1, install.install_steerer"),
    # .np / .gpu of a CpuGpuBuffer; positions is a plain tensor (install.run_self_test fills [:1])
    Internal(V1_RUNNER, "GPUModelRunner.query_start_loc", "attribute", "runner_v1.batch_view_v1", value_prefix="self._make_buffer("),
    Internal(V1_RUNNER, "GPUModelRunner.input_ids", "attribute", "install.run_self_test", value_prefix="self._make_buffer("),
    Internal(V1_RUNNER, "GPUModelRunner.positions", "attribute", "install.run_self_test", value_prefix="torch.zeros("),
    *_attrs("vllm.v1.utils", "CpuGpuBuffer", ("np", "gpu"), "runner_v1.batch_view_v1, install.run_self_test"),
    *_attrs(V1_BATCH, "InputBatch", ("num_reqs", "req_ids", "num_computed_tokens_cpu"), "runner_v1.batch_view_v1"),
    *_attrs(V1_BATCH, "CachedRequestState", ("num_prompt_tokens", "sampling_params"), "runner_v1.batch_view_v1"),
    Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "class", "runner_v1.batch_view_v1 (V1 on the CPU build)"),
    # Model Runner V2 (runner_v2)
    Internal(V2_RUNNER, "GPUModelRunner", "class", "runner_v2.is_v2_runner"),
    *(
        Internal(V2_RUNNER, f"GPUModelRunner.{m}", "method", "runner_v2.install_v2", leading=("scheduler_output",))
        for m in V2_RUNNER_METHODS
    ),
    Internal(V2_RUNNER, "GPUModelRunner.execute_model", "method", "runner_v2.install_v2"),
    Internal(
        V2_RUNNER,
        "GPUModelRunner._dummy_run",
        "method",
        "runner_v2.self_test_step",
        leading=("num_tokens",),
        keywords=("uniform_decode",),
    ),
    *_attrs(V2_RUNNER, "GPUModelRunner", ("parallel_config", "speculator"), "runner_v2._check_runner"),
    *_attrs(V2_BATCH, "InputBatch", V2_INPUT_BATCH_FIELDS, "runner_v2.batch_view_v2"),
    Internal(V2_BATCH, "InputBatch.make_dummy", "classmethod", "runner_v2.install_v2 (dummy runs bypass prepare_inputs)"),
    *_attrs(SCHED_OUTPUT, "NewRequestData", V2_NEW_REQUEST_ATTRS, "runner_v2.RequestRegistry.add_new"),
    *_attrs(SCHED_OUTPUT, "SchedulerOutput", V2_SCHEDULER_OUTPUT_FIELDS, "runner_v2.install_v2"),
    # decoder layers of the supported architectures
    *(i for a in ARCHITECTURES for i in _architecture(a)),
    # API server (middleware.py, launcher.py)
    Internal("vllm.entrypoints.openai.api_server", "", "module", "launcher.main (python -m ...)", runnable=True),
    Internal("vllm.entrypoints.cli.main", "main", "function", "serve.run_vllm_serve"),
    Internal(
        "vllm.entrypoints.common.cli_args",
        "FrontendArgs.middleware",
        "attribute",
        "launcher.build_vllm_args (--middleware)",
        also_in=("vllm.entrypoints.launchers.cli_args",),  # 0.32
    ),
    Internal("vllm.engine.arg_utils", "EngineArgs.additional_config", "attribute", "launcher.build_vllm_args (--additional-config)"),
    Internal("vllm.engine.arg_utils", "EngineArgs.worker_extension_cls", "attribute", "launcher.build_vllm_args (--worker-extension-cls)"),
    Internal("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware", "class", "auth.AuthGate.wrap"),
    Internal(
        "vllm.entrypoints.launchers.api_server.app_state",
        "init_app_state",
        "text",
        "engine.model_shape, engine.EngineWorkers.of",
        key="state.engine_client = engine_client",
    ),
    Internal(
        "vllm.engine.protocol",
        "EngineClient.collective_rpc",
        "method",
        "engine.EngineWorkers.stats, engine.EngineWorkers.load",
        leading=("method",),
        keywords=("timeout", "args"),
    ),
    Internal(
        "vllm.v1.engine.async_llm",
        "AsyncLLM.collective_rpc",
        "method",
        "engine.EngineWorkers.stats, engine.EngineWorkers.load",
        leading=("method",),
        keywords=("timeout", "args"),
    ),
    *_attrs("vllm.v1.engine.async_llm", "AsyncLLM", ("model_config", "vllm_config"), "engine.model_shape, engine.EngineWorkers.api_process_count"),
    Internal("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.vllm_xargs", "attribute", "service.SteeringService.rewrite_request (/v1/chat/completions)"),
    Internal("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.vllm_xargs", "attribute", "service.SteeringService.rewrite_request (/v1/completions)"),
    Internal("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest.vllm_xargs", "attribute", "middleware.SteeringMiddleware._steerable (/v1/responses)"),
    Internal("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest.vllm_xargs", "attribute", "middleware.SteeringMiddleware._steerable (/v1/messages)"),
)  # fmt: skip
