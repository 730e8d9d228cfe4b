"""Gating the fixed-shape op's work on device flags, with no host read of device values at replay.

While a CUDA graph is captured, a gated body is recorded into a CUDA-graph conditional "if" node (CUDA >= 12.4,
torch's CUDAGraph.begin_capture_to_if_node, as torch's own torch.cond capture uses them): a replay runs the
body only when the flag holds at replay time. Every body is recorded at capture, whatever the flags hold then.
Off a capture (the CPU, op_bench's forced fixed-shape path) the flag's host copy, written by the same step,
picks the body, so that the tensor work is exactly what a replay would run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

logger = logging.getLogger("steer_plugin")


class Flag(NamedTuple):
    """One gate's flag, written by the host before the forward."""

    device: torch.Tensor  # 0-d bool with a fixed address: what a replay reads
    host: np.ndarray  # [1] bool view of its host copy (the same memory as `device` on the CPU)


def flags_of(device: torch.Tensor, host: torch.Tensor, start: int = 0) -> list[Flag]:
    """A Flag per element of a 1-D bool buffer (from `start`) and its host copy."""
    host_np = host.numpy()
    return [Flag(device[i], host_np[i : i + 1]) for i in range(start, device.shape[0])]


class ConditionalsUnavailable(RuntimeError):
    """The graph being captured cannot take a conditional node (CUDA < 12.4, ROCm, an allocator setting)."""


class Gate:
    """Runs a body under a flag."""

    def when(self, flag: Flag, body: Callable[[], None]) -> None:
        raise NotImplementedError


class HostGate(Gate):
    """No graph is being captured: the host copy of the flag decides."""

    def when(self, flag: Flag, body: Callable[[], None]) -> None:
        if flag.host[0]:
            body()


class AlwaysGate(Gate):
    """Every body runs (the ungated fallback while capturing without conditional nodes)."""

    def when(self, flag: Flag, body: Callable[[], None]) -> None:
        body()


class GraphGate(Gate):
    """A graph is being captured: each body becomes a conditional node reading the device flag at replay."""

    def __init__(self, graph):
        self.graph = graph  # torch.cuda.CUDAGraph (or a stand-in with the same two methods)
        self.depth = 0

    def when(self, flag: Flag, body: Callable[[], None]) -> None:
        try:
            self.graph.begin_capture_to_if_node(flag.device)
        except Exception as err:
            if self.depth == 0:  # nothing recorded yet: the caller can still capture its ungated form
                raise ConditionalsUnavailable(str(err)) from err
            raise
        self.depth += 1
        try:
            body()
        finally:
            self.depth -= 1
            self.graph.end_capture_to_conditional_node()


HOST = HostGate()
ALWAYS = AlwaysGate()


def _conditionals_built() -> bool:
    """This torch build can record conditional nodes (CUDA >= 12.4, not ROCm)."""
    cuda = torch.version.cuda
    if cuda is None or getattr(torch.version, "hip", None):
        return False
    major, minor = (int(v) for v in cuda.split(".")[:2])
    return (major, minor) >= (12, 4) and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


class _Support:
    usable: bool | None = None  # None: not checked yet
    logged = False


def capturing_graph():
    """The torch CUDAGraph being captured on the current stream, or None when no capture is under way."""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return None
    return torch.cuda.CUDAGraph.get_currently_capturing_graph()


def disable_conditionals(reason: str) -> None:
    """Conditional nodes do not work here: log once; captures from now on use the ungated form."""
    _Support.usable = False
    if not _Support.logged:
        _Support.logged = True
        logger.warning(
            "steer_plugin: CUDA-graph conditional nodes unavailable (%s); the captured op computes every "
            "token row (gathered per row, not gated on the rows steered)",
            reason,
        )


def gate_for_call() -> Gate | None:
    """HOST when no graph is being captured; a GraphGate while one is and conditional nodes can gate the work;
    None while one is captured without them (the op then records its ungated form)."""
    try:
        graph = capturing_graph()
    except Exception as err:  # a capture that is not a torch CUDAGraph's
        disable_conditionals(f"no torch CUDAGraph for the capture: {err}")
        return None
    if graph is None:
        return HOST
    if _Support.usable is None:
        _Support.usable = _conditionals_built()
        if not _Support.usable:
            disable_conditionals(f"torch built with CUDA {torch.version.cuda}, HIP {torch.version.hip}")
    return GraphGate(graph) if _Support.usable else None
