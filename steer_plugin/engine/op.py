"""The steering op: an opaque torch custom op over persistent per-step and per-layer buffers.

Compilers (dynamo/inductor) see only the op and its fake implementation, so a model compiled with the op in
place runs its body on every step; a captured CUDA graph replays its kernels, reading whatever the buffers
hold at replay time. While a graph is being captured the body takes no per-step host decision: it records the
fixed-shape form (fixed.py), whose work follows the step's lanes (the steered rows, gated on device flags).
Otherwise (eager, CPU, or a non-captured step) it runs the same math on the steered rows only and over the
live working-set columns only, deciding on the host.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from steer_plugin.engine import fixed
from steer_plugin.engine.delta import (
    Conditions,
    DeltaTerms,
    add_delta,
    position_gate,
    working_set_weights,
)
from steer_plugin.engine.lanes import Lanes
from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import NO_OP, LayerTables

OP_NAMESPACE = "steer_plugin"
logger = logging.getLogger("steer_plugin")


class LayerRuntime:
    """Everything the op needs at one layer: the step metadata, the tables, the capture buffer and the probe."""

    def __init__(self, tables: LayerTables, step: StepMetadata, observable: bool):
        self.tables = tables
        self.step = step
        self.layer = tables.bank.layer
        d_model = tables.dec.shape[1]
        device = tables.dec.device
        self.observable = observable  # some SAE sits at this layer (inspect / monitoring may read it)
        # Steered residual of observed rows (inspect / monitoring), indexed by token row, read after the forward.
        self.capture = torch.zeros(
            step.max_tokens if observable else 0, d_model, dtype=torch.float32, device=device
        )
        # The observed rows of this step as lanes (set per step through capture_rows; see lanes.py).
        self.observed = Lanes(step.max_tokens, device) if observable else None
        self.capture_prefix = 0  # n when this step's observed rows are exactly 0..n-1 (see capture_rows)
        self.seconds = 0.0  # host time in the op body (eager executions)
        # probe[0] is set to 1 whenever the op runs; probe[1] = the delta it added to row 0 (float32).
        self.probe = torch.zeros(2, d_model, dtype=torch.float32, device=device)  # [2, d_model]
        self.mismatches = 0  # forwards shorter than the prepared batch (left unsteered)
        fixed.warm_up(self)

    @property
    def capture_rows(self) -> torch.Tensor | None:
        """Token rows whose steered residual is copied to `capture` this step ([n] on the device), or None."""
        if self.observed is None or not self.observed.count:
            return None
        return self.observed.live()

    @capture_rows.setter
    def capture_rows(self, rows) -> None:
        """Set per step: the token rows (array-like; a tensor is read back to the host), None for none."""
        if self.observed is None:
            return
        if rows is None:
            self.observed.clear()
            self.capture_prefix = 0
            return
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        self.observed.write(rows, int(rows.max()) + 1 if rows.size else 0)
        # Sorted, unique rows that are exactly 0..n-1: the eager op copies them without a gather.
        self.capture_prefix = rows.size if rows.size and rows[0] == 0 and rows[-1] == rows.size - 1 else 0


def _log_mismatch(rt: LayerRuntime, num_tokens: int) -> None:
    """Metadata prepared for a bigger batch (a forward that skipped preparation): leave this one unsteered."""
    rt.mismatches += 1
    if rt.mismatches <= 3:
        logger.error(
            "steer_plugin: layer %d: steering prepared for %d rows, forward has %d; left unsteered",
            rt.layer,
            rt.step.num_tokens,
            num_tokens,
        )


# layer index -> runtime, for the current process (one engine per worker process).
LAYERS: dict[int, LayerRuntime] = {}


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Eager: above this many live columns, multiply per block of requests over the block's own columns.
BLOCK_COLUMNS = 1024


def steer_rows(
    rt: LayerRuntime,
    x: torch.Tensor | None,
    res: torch.Tensor,
    slots: torch.Tensor,
    pos: torch.Tensor,
    width: int,
    terms: DeltaTerms,
    position_rules: bool,
    blocks: list[tuple[int, int, int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For n rows: (steered residual [n, d] in res's dtype, steered [n] bool, delta of the first row [d] f32).
    x [n, d] float32 is the residual stream after the layer (None when `terms` need no x), res [n, d] the
    residual. blocks: (first row, end row, first column, end column) of row blocks whose entries use only those
    columns (the GEMMs then run per block instead of over all `width` columns)."""
    t, step = rt.tables, rt.step
    cols = t.slot_col[slots]  # [n, K]
    code = t.slot_code[slots]  # [n, K]
    if position_rules:
        applies = position_gate(code, t.slot_last_n[slots], pos, step.prompt_len[slots])  # [n, K]
    else:
        applies = code != NO_OP
    coef = t.slot_coef[slots]  # [n, K, 3]
    cond = (
        Conditions(t.slot_cond_col[slots], t.slot_cond_thr[slots], t.slot_cond_sign[slots])
        if terms.cond
        else None
    )
    if blocks is None:
        blocks = [(0, cols.shape[0], 0, width)]
    new = torch.empty_like(res)
    applied = torch.empty_like(applies)  # [n, K] after the conditions

    def local(c: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        return c if c0 == 0 else (c - c0).clamp_(0, c1 - c0 - 1)  # unused entries: anywhere

    for r0, r1, c0, c1 in blocks:
        weights, applied[r0:r1] = working_set_weights(
            None if x is None else x[r0:r1],
            local(cols[r0:r1], c0, c1),
            coef[r0:r1],
            applies[r0:r1],
            t.enc[c0:c1],
            c1 - c0,
            t.params[c0:c1],
            terms,
            None
            if cond is None
            else Conditions(local(cond.cols[r0:r1], c0, c1), cond.threshold[r0:r1], cond.sign[r0:r1]),
        )
        new[r0:r1] = add_delta(res[r0:r1], weights, t.dec[c0:c1])
        if r0 == 0:
            first_delta = (weights[:1] @ t.dec[c0:c1].float())[0]
    # Steered (token, op) pairs by op, counted on the device (graph replays count too).
    t.op_counts.index_add_(0, t.slot_op[slots].flatten(), applied.flatten().long())
    steered = applied.any(dim=-1)
    new = torch.where(steered[:, None], new, res)  # rows no entry applies to: bit for bit
    return new, steered, first_delta


def column_blocks(rt: LayerRuntime, rows: np.ndarray) -> list[tuple[int, int, int, int]] | None:
    """Row blocks (over the steered rows, in order) of whole requests whose live columns span at most
    BLOCK_COLUMNS, or None when one GEMM over the working set is as cheap (few columns, or scattered ones)."""
    t = rt.tables
    if t.width <= BLOCK_COLUMNS or rows.size < 2:
        return None
    slots = rt.step.token_slot_host.numpy()[rows]  # [n]
    starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])  # first row of each request
    ends = np.r_[starts[1:], slots.size]
    request_slots = slots[starts]
    live = t.slot_code_host.numpy()[request_slots] != NO_OP  # [R, K]
    cond_live = live & (t.slot_cond_sign_host.numpy()[request_slots] != 0)
    live = np.concatenate([live, cond_live], axis=1)  # op columns, then condition columns
    cols = np.concatenate(
        [t.slot_col_host.numpy()[request_slots], t.slot_cond_col_host.numpy()[request_slots]], axis=1
    )
    lo = np.where(live, cols, t.capacity).min(axis=1)
    hi = np.where(live, cols, -1).max(axis=1) + 1
    blocks, b_start, b_lo, b_hi = [], 0, int(lo[0]), int(hi[0])

    def close(first: int, last: int) -> None:  # a block with no live column multiplies over column 0
        blocks.append((int(starts[first]), int(ends[last]), *((b_lo, b_hi) if b_hi > b_lo else (0, 1))))

    for i in range(1, len(starts)):
        new_lo, new_hi = min(b_lo, int(lo[i])), max(b_hi, int(hi[i]))
        if new_hi - new_lo > BLOCK_COLUMNS:
            close(b_start, i - 1)
            b_start, new_lo, new_hi = i, int(lo[i]), int(hi[i])
        b_lo, b_hi = new_lo, new_hi
    close(b_start, len(starts) - 1)
    if len(blocks) == 1:
        return None
    return blocks


def apply_eager(rt: LayerRuntime, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Only the steered rows, only the live working-set columns; other rows are copied bit for bit."""
    step, t = rt.step, rt.tables
    if step.num_tokens > residual.shape[0]:
        _log_mismatch(rt, residual.shape[0])
        return residual.clone()
    out = None
    n = step.steered_rows_host.size
    if n and t.width:
        every_row = n == residual.shape[0]
        rows = step.steered_rows
        res = residual if every_row else residual[rows]  # [n, d]
        terms = t.terms
        x = (hidden if every_row else hidden[rows]).float() + res.float() if terms.needs_x else None
        slots = step.token_slot[:n] if every_row else step.token_slot[rows]
        pos = step.token_pos[:n] if every_row else step.token_pos[rows]
        blocks = column_blocks(rt, step.steered_rows_host)
        new, steered, first_delta = steer_rows(
            rt, x, res, slots, pos, t.width, terms, t.position_rules, blocks
        )
        if every_row:
            out = new
        else:
            out = residual.clone()
            out[rows] = new
        if int(step.steered_rows_host[0]) == 0:
            rt.probe[1].copy_(first_delta * steered[0])
    if out is None:
        out = residual.clone()
    rows = rt.capture_rows
    if rows is not None and rows.numel():
        n = rt.capture_prefix
        if n:  # rows 0..n-1 (every token of the step observed): in place, no gather
            capture_sum(rt.capture, hidden, out, n)
        else:  # the same sum in float32, gathered
            rt.capture.index_copy_(
                0, rows, hidden.index_select(0, rows).float().add_(out.index_select(0, rows))
            )
    return out


CPU_CAPTURE_CHUNK = 1 << 18  # elements: a float32 MiB, which stays in a CPU core's cache


def capture_sum(capture: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor, n: int) -> None:
    """capture[:n] = hidden[:n] + out[:n] in float32. On the CPU in chunks of rows: a mixed-dtype in-place add
    over a large block runs ~4x slower than the same add a cache-sized block at a time (T = 2048, d 4096)."""
    rows = max(1, CPU_CAPTURE_CHUNK // capture.shape[1]) if capture.device.type == "cpu" else n
    for first in range(0, n, rows):
        last = min(first + rows, n)
        capture[first:last].copy_(hidden[first:last]).add_(out[first:last])


@torch.library.custom_op(f"{OP_NAMESPACE}::steer_residual", mutates_args=())
def steer_residual(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    """New residual [T, d] = residual + steering delta on the steered rows of this layer."""
    rt = LAYERS.get(layer)
    if rt is None or residual.shape[0] == 0:
        return residual.clone()
    if _capturing():
        out = fixed.apply_fixed_shape(rt, hidden, residual)
    else:
        started = time.perf_counter()
        out = apply_eager(rt, hidden, residual)
        rt.seconds += time.perf_counter() - started
    rt.probe[0].fill_(1.0)
    return out


@steer_residual.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(residual)
