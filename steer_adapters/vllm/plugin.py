"""Entry point registered under `vllm.general_plugins`: runs in every vLLM process (API server, engine core,
workers). It only patches; nothing loads until a worker loads its model with a steering config present."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("steer_plugin")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    log_through_vllm(logger)
    from steer_adapters.vllm import engine_core
    from steer_adapters.vllm.worker import install
    from steer_plugin import signing

    signing.wire_key()
    carry_to_ray_workers()
    engine_core.patch_prefix_cache()  # checks the engine core's internals first (preflight.py)
    install.patch_workers()


class ToVllmLogger(logging.Handler):
    """Hands a record to the "vllm" logger as it is when the record is made: its level, handlers and format
    (VLLM_LOGGING_LEVEL, VLLM_LOGGING_CONFIG_PATH, or the operator's own when VLLM_CONFIGURE_LOGGING=0)."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if vllm_logger.isEnabledFor(record.levelno):
            vllm_logger.handle(record)


def log_through_vllm(ours: logging.Logger) -> None:
    """Our core logs under "steer_plugin"; print it as vLLM prints its own. Forwarded when logged, not copied
    now: the API server sets vLLM's logging up after plugins load (copying its handlers here found none there,
    so that process's info lines were lost)."""
    if not any(isinstance(h, ToVllmLogger) for h in ours.handlers):
        ours.addHandler(ToVllmLogger())
        ours.setLevel(logging.DEBUG)  # vLLM's level decides, in the handler
        ours.propagate = False


RAY_COPY_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"


def carry_to_ray_workers() -> None:
    """Ray starts workers from its own daemons (on this host or others), not through multiprocessing from this
    process: they do not share its signing key (steer_plugin/signing.py), and vLLM copies to them only the
    variables it is told about (vllm/ray/ray_env.py). So with Ray the key must be set (STEER_PLUGIN_WIRE_KEY) and
    is copied to the Ray workers; a Ray worker without it refuses to start instead of dropping every steering
    message (and could not authenticate its observation messages, monitor/transport.py)."""
    from steer_plugin import signing

    names = [n.strip() for n in os.environ.get(RAY_COPY_ENV, "").split(",") if n.strip()]
    if signing.KEY_ENV not in names:
        names.append(signing.KEY_ENV)
    os.environ[RAY_COPY_ENV] = ",".join(names)
    if _in_ray_worker() and not os.environ.get(signing.KEY_ENV):
        raise RuntimeError(
            f"steer_plugin: this is a Ray worker and {signing.KEY_ENV} is not set: it cannot verify the API "
            f"server's steering messages. Set {signing.KEY_ENV} (a random secret, the same for the whole server) "
            "in the environment that starts vLLM; the plugin has vLLM copy it to the Ray workers."
        )


def _in_ray_worker() -> bool:
    """Whether this process is a Ray worker (an actor started by Ray, not the driver)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        worker_mode = getattr(ray, "WORKER_MODE", 1)  # ray._private.worker.WORKER_MODE
        return bool(ray.is_initialized()) and ray.get_runtime_context().worker.mode == worker_mode
    except Exception:  # an unexpected Ray: never stop a start-up on this check
        return False
