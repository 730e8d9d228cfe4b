"""The steering op: an opaque torch custom op over persistent per-layer buffers.

Compilers (dynamo/inductor) see only the op and its fake implementation, so a model compiled with the op in
place runs its body on every step; a captured CUDA graph replays its kernels, reading whatever the tables
hold at replay time. The body takes no per-step host decision while a graph is being captured.
"""

from __future__ import annotations

import logging
import time

import torch

from steer_plugin.engine.bank import LayerBank
from steer_plugin.engine.delta import steering_delta
from steer_plugin.engine.tables import LayerTables

OP_NAMESPACE = "steer_plugin"
logger = logging.getLogger("steer_plugin")


class LayerRuntime:
    """Everything the op needs at one layer: the bank, the tables, the capture buffer and the self-test probe."""

    def __init__(self, bank: LayerBank, tables: LayerTables, max_graph_captures: int = 1):
        self.bank = bank
        self.tables = tables
        d_model = bank.dec.shape[1]
        device = bank.dec.device
        # Steered residual rows of observed tokens (inspect / monitoring), read after the forward.
        self.capture = torch.zeros(tables.max_tokens, d_model, dtype=torch.float32, device=device)  # [M, d]
        self.capture_rows_host = torch.zeros(
            tables.max_tokens, dtype=torch.int64, pin_memory=device.type == "cuda"
        )
        self.capture_rows = (
            self.capture_rows_host
            if device.type == "cpu"
            else torch.zeros_like(self.capture_rows_host, device=device)
        )
        self.num_capture = 0  # host int: observed rows this step (0 when the step was not prepared)
        self.num_capture_written = 0  # host int: capture_rows entries the last prepare() wrote
        self.max_graph_captures = max_graph_captures  # rows a captured graph copies (padding rows read row 0)
        self.seconds = 0.0  # host time in the op body (eager executions)
        # probe[0] is set to 1 whenever the op runs; probe[1] = the delta it added to row 0 (float32).
        self.probe = torch.zeros(2, d_model, dtype=torch.float32, device=bank.dec.device)  # [2, d_model]
        self.calls = 0  # host count of eager executions (graph replays do not count)
        self.mismatches = 0  # forwards whose prepared tables did not fit (left unsteered)

    def capture_max_row(self, n: int) -> int:
        return int(self.capture_rows_host[:n].max())


def _log_mismatch(rt: LayerRuntime, num_tokens: int) -> None:
    """Tables prepared for another batch (a forward that skipped preparation): leave this one unsteered."""
    rt.mismatches += 1
    if rt.mismatches <= 3:
        logger.error(
            "steer_plugin: layer %d: steering tables do not match a forward of %d tokens; left unsteered",
            rt.bank.layer,
            num_tokens,
        )


# layer index -> runtime, for the current process (one engine per worker process).
LAYERS: dict[int, LayerRuntime] = {}


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def apply_dense(rt: LayerRuntime, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """All rows, fixed shapes: what a CUDA graph captures. Unsteered rows pass through torch.where untouched."""
    num_tokens = residual.shape[0]
    t = rt.tables
    x = hidden.float() + residual.float()  # [T, d] residual stream after the layer
    delta = steering_delta(
        x, t.idx[:num_tokens], t.coef[:num_tokens], rt.bank.dec, rt.bank.enc, rt.bank.params
    )
    steered = (residual.float() + delta).to(residual.dtype)
    rt.probe[1].copy_(delta[0] * t.mask[0])
    return torch.where(t.mask[:num_tokens, None], steered, residual)


def apply_sparse(rt: LayerRuntime, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Only the steered rows (the host knows how many); other rows are copied bit for bit."""
    out = residual.clone()
    n = rt.tables.num_rows
    if n == 0:
        return out
    if int(rt.tables.rows_host[n - 1]) >= residual.shape[0]:  # rows ascend; tables of another batch
        _log_mismatch(rt, residual.shape[0])
        return out
    rows = rt.tables.rows[:n]  # [n]
    x = hidden[rows].float() + residual[rows].float()  # [n, d]
    t = rt.tables
    delta = steering_delta(x, t.idx[rows], t.coef[rows], rt.bank.dec, rt.bank.enc, rt.bank.params)
    out[rows] = (residual[rows].float() + delta).to(residual.dtype)
    if int(t.rows_host[0]) == 0:
        rt.probe[1].copy_(delta[0])
    return out


@torch.library.custom_op(f"{OP_NAMESPACE}::steer_residual", mutates_args=())
def steer_residual(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """New residual [T, d] = residual + steering delta on the steered rows of this layer."""
    rt = LAYERS.get(layer)
    if rt is None or residual.shape[0] == 0:
        return residual.clone()
    if _capturing():
        out = apply_dense(rt, hidden, residual)
        width = min(rt.max_graph_captures, rt.capture.shape[0])
        # Clamped in the graph: whatever a replay finds in capture_rows indexes a row of this batch.
        rows = rt.capture_rows[:width].clamp(0, residual.shape[0] - 1)
        rt.capture[:width].copy_(hidden[rows].float() + out[rows].float())
    else:
        started = time.perf_counter()
        rt.calls += 1
        out = apply_sparse(rt, hidden, residual)
        n = rt.num_capture
        if n and rt.capture_max_row(n) < residual.shape[0]:
            rows = rt.capture_rows[:n]
            rt.capture[:n] = hidden[rows].float() + out[rows].float()
        elif n:
            _log_mismatch(rt, residual.shape[0])
        rt.seconds += time.perf_counter() - started
    rt.probe[0].fill_(1.0)
    return out


@steer_residual.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(residual)
