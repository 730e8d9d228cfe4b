"""Entry point registered under `vllm.general_plugins`: runs in every vLLM process (API server, engine core,
workers). It only patches; nothing loads until a worker loads its model with a steering config present."""

from __future__ import annotations

import logging

logger = logging.getLogger("steer_plugin")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    # Our core logs under "steer_plugin"; print it through vLLM's handlers and format.
    vllm_logger = logging.getLogger("vllm")
    if not logger.handlers and vllm_logger.handlers:
        logger.handlers = list(vllm_logger.handlers)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    from steer_adapters.vllm import glue

    glue.select_model_runner()
    glue.patch_request_salt()
    glue.patch_workers()
