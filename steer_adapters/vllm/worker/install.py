"""Worker start-up: after the model loads, build the Steerer and insert the steering op after each steered decoder
layer; after compile and warm-up, run the self-test on a real decode step. Which runner the worker has (V1 or V2)
decides which runner module hooks its step.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from steer_adapters.vllm import internals, preflight
from steer_adapters.vllm.worker import extension, runner_v1, runner_v2
from steer_plugin.config import SteerConfig, config_from_sources
from steer_plugin.engine.steerer import Steerer

logger = logging.getLogger("steer_plugin")

# Decoder-layer classes whose forward returns (hidden_states, residual), residual stream = their sum (= HF
# hidden_states[L + 1], Gemma 2/3's post-attention / post-feedforward norms included). internals.ARCHITECTURES is
# checked against every pinned vLLM; each one is run on the CPU build against the HF reference:
# tests/integration/test_architectures.py.
SUPPORTED_ARCHITECTURES = tuple(a.name for a in internals.ARCHITECTURES)
SKIP_HOOKS_ENV = "STEER_PLUGIN_TEST_SKIP_HOOKS"  # test-only: simulate a hook lost to compilation
COMPILE_KEY = "steer_plugin_fingerprint"  # our entry in additional_config, part of vLLM's compile-cache key


class UnsupportedModelError(RuntimeError):
    pass


def key_compile_cache(vllm_config, config: SteerConfig) -> None:
    """Key vLLM's compile cache on the content of the config this worker loaded, however it was given.

    vLLM keys its compile cache on the config's hash, which covers `additional_config` (0.32/0.33
    `VllmConfig.compute_hash`, 0.34 `VllmConfig.compile_factors`). Without this, a config named only by
    STEER_PLUGIN_CONFIG, or edited under the same path, could load a graph compiled without our op or with it at
    other layers. Runs after the model loads, before the first forward compiles it."""
    additional = vllm_config.additional_config
    if isinstance(additional, dict):
        additional[COMPILE_KEY] = config.fingerprint()
    else:  # an object of the operator's with its own hash: leave it, and say the cache may be stale
        logger.warning(
            "steer_plugin: additional_config is a %s, not a dict: the compile cache is not keyed on the steering "
            "config (clear vLLM's compile cache after changing it)",
            type(additional).__name__,
        )


def refuse_unsupported_modes(vllm_config) -> None:
    """Modes whose forwards the per-step tables cannot describe are refused at start-up."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "use_ubatching", False):
        raise UnsupportedModelError(
            "steer_plugin does not support dual-batch overlap / micro-batching (--enable-dbo, ubatch_size > 1): "
            "each micro-batch slices the batch's rows, and steering tables are per step. Disable it, or run "
            "this server without a steering config."
        )


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


def runner_module(runner):
    """The module that hooks this runner's steps: runner_v2 for Model Runner V2, runner_v1 otherwise."""
    return runner_v2 if runner_v2.is_v2_runner(runner) else runner_v1


def install_steerer(worker, config: SteerConfig) -> Steerer:
    """After the model is loaded, before it is compiled: load banks, insert the op after each steered layer."""
    vllm_config = worker.vllm_config
    refuse_unsupported_modes(vllm_config)
    key_compile_cache(vllm_config, config)
    if config.allow_v2_model_runner:
        logger.warning(
            "steer_plugin: allow_v2_model_runner is deprecated and ignored (steering runs on either)"
        )
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
    runner_module(runner).install(runner, model, steerer)  # raises if the runner's layout changed
    extension.attach(worker, steerer)
    if not isinstance(worker, extension.SteerWorkerExtension):
        # Steering works without it; /metrics' worker figures and runtime loads call its methods.
        logger.warning(
            "steer_plugin: the worker lacks %s (--worker-extension-cls is %r): /metrics has no worker figures "
            "and runtime loads are refused. steer-serve adds it; with plain vLLM pass "
            "--worker-extension-cls %s (LLM(..., worker_extension_cls=...) in Python)",
            extension.EXTENSION_PATH,
            vllm_config.parallel_config.worker_extension_cls,
            extension.EXTENSION_PATH,
        )
    return steerer


def _parallel_ranks() -> dict[str, int]:
    """This worker's pipeline and tensor ranks (only TP rank 0 writes observations; /metrics sums stages)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    return {"pp_rank": get_pp_group().rank_in_group, "tp_rank": get_tp_group().rank_in_group}


def run_self_test(worker) -> None:
    steerer = extension.steerer_of(worker)
    if steerer is None or not steerer.config.self_test:
        return
    runner = worker.model_runner
    steerer.self_test(runner_module(runner).self_test_step(runner))


def add_logits_processor(worker) -> None:
    """On Model Runner V2: add the AbortWhen processor (abort.py) to the engine's logits processors
    (`model_config.logits_processors`, vLLM's `--logits-processors`) before the model loads, which is when V2
    builds them."""
    if not runner_v2.is_v2_runner(worker.model_runner):
        return
    from steer_adapters.vllm.worker.abort import AbortWhen

    model_config = worker.vllm_config.model_config
    processors = list(model_config.logits_processors or ())
    if AbortWhen not in processors:
        model_config.logits_processors = [*processors, AbortWhen]


def patch_workers() -> None:
    """Hook worker start-up: install the steerer after load_model, self-test after compile/warm-up."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    if getattr(WorkerWrapperBase.init_device, "_steer_patched", False):
        return
    original_init_device = WorkerWrapperBase.init_device

    @functools.wraps(original_init_device)
    def init_device(self):
        result = original_init_device(self)
        preflight.check("worker")  # refuses to start, naming what moved, on a vLLM we do not fit
        worker = self.worker
        load_model, warm_up = worker.load_model, worker.compile_or_warm_up_model

        @functools.wraps(load_model)
        def load_model_and_steer(*args, **kwargs):
            config = config_from_sources(worker.vllm_config.additional_config)  # read once per worker
            if config is None:  # no steering config: the worker runs as plain vLLM
                return load_model(*args, **kwargs)
            add_logits_processor(worker)
            result = load_model(*args, **kwargs)
            install_steerer(worker, config)
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
