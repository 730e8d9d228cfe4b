"""The plugin's log lines go out as vLLM's do, whenever vLLM sets its logging up (the API server does so after
plugins load)."""

from __future__ import annotations

import logging

import pytest

from steer_adapters.vllm.plugin import log_through_vllm


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def vllm_logger():
    vllm = logging.getLogger("vllm")
    saved = (vllm.handlers[:], vllm.level, vllm.propagate)
    vllm.handlers = []
    yield vllm
    vllm.handlers, vllm.level, vllm.propagate = saved[0], saved[1], saved[2]


def test_lines_logged_before_and_after_vllm_sets_up_its_handlers_reach_them_at_its_level(vllm_logger):
    ours = logging.getLogger("steer_plugin_logging_test")
    log_through_vllm(ours)
    log_through_vllm(ours)  # once: a second register() adds no second handler
    assert len(ours.handlers) == 1
    kept = Kept()  # vLLM's handler, set up after the plugin registered (as the API server does)
    vllm_logger.addHandler(kept)
    vllm_logger.propagate = False
    vllm_logger.setLevel(logging.INFO)
    ours.info("serving %s", "demo")
    ours.debug("not at vLLM's level")
    assert [r.getMessage() for r in kept.records] == ["serving demo"]
    assert kept.records[0].name == "steer_plugin_logging_test"  # shown as ours, in vLLM's format
    vllm_logger.setLevel(logging.WARNING)  # VLLM_LOGGING_LEVEL=WARNING
    ours.info("dropped")
    ours.warning("kept")
    assert [r.getMessage() for r in kept.records] == ["serving demo", "kept"]
