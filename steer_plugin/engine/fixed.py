"""The op's fixed-shape form: what a CUDA graph captures, with its work following the live rows.

No per-step host decision is possible at replay, so the work is organised around the step's lanes (lanes.py):
the steered rows, padded up to a bucket size, in a buffer with a fixed address. For each bucket a branch
computes, per lane and per operation entry, from that entry's own rows of the working set (the bgmv form of
vLLM's punica LoRA kernels, instead of GEMMs over the whole working set):
    dots[l, k] = x[l] · enc[col[l, k]]                 (only when some live entry reads a feature / a condition)
    c[l, k]    = the coefficient formula (delta.py's terms, the ones the eager op composes)
    delta[l]   = Σ_k c[l, k] · dec[col[l, k]]
and writes the lane rows of the output; every other row is the input residual, bit for bit. The branches are
gated on device flags (gate.py): while capturing, each becomes a conditional node, all of them recorded, under
one outer "some row is steered" node; off a capture the flags' host copies pick the branch. Observed rows
(inspect, monitoring) are copied out the same way, from their own lanes.
Cost ~ lanes × K × d per step instead of T × capacity × d.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from steer_plugin.engine.delta import (
    Conditions,
    TokenScales,
    combine,
    condition_holds,
    norm_add_term,
    position_gate,
    read_term,
    token_sigma,
)
from steer_plugin.engine.gate import (
    ALWAYS,
    ConditionalsUnavailable,
    Gate,
    disable_conditionals,
    gate_for_call,
)
from steer_plugin.engine.lanes import Lanes
from steer_plugin.engine.tables import NO_OP

if TYPE_CHECKING:
    from steer_plugin.engine.op import LayerRuntime


def run_lanes(lanes: Lanes, num_tokens: int, gate: Gate, body: Callable[[torch.Tensor], None]) -> None:
    """body(rows [size]) for the live bucket of `lanes` in a forward of num_tokens rows: under one outer flag
    (some lane is live and the prepared batch fits), one branch per bucket such a forward can have live."""

    def buckets() -> None:
        for i, size in lanes.buckets_upto(num_tokens):
            gate.when(lanes.bucket(i), lambda size=size: body(lanes.rows[:size]))

    gate.when(lanes.fits(num_tokens), buckets)


def lane_dots(x: torch.Tensor, enc: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [n, d] float32 · each entry's encoder row enc[cols] ([n, K] columns) -> [n, K] float32."""
    return torch.bmm(F.embedding(cols, enc), x[:, :, None])[..., 0]  # [n, K, d] @ [n, d, 1]


def steer_lanes(
    rt: LayerRuntime,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    gate: Gate,
    padded: bool = True,
) -> None:
    """Write the steered residual of token rows `rows` [n] (lanes) into out [T, d]. With `padded`, lanes past
    the live ones repeat the last live row (ascending rows: a lane whose row is not above the previous lane's
    is padding): they write the same values and are not counted.

    Each term of the formula runs under its table flag (the terms some live slot needs, like the eager op's
    host DeltaTerms) and otherwise keeps its neutral value, which gives the same coefficient."""
    t, step = rt.tables, rt.step
    flags = t.flags
    n, k, d = rows.shape[0], t.max_ops, residual.shape[1]
    device = rows.device
    slots = step.token_slot.index_select(0, rows)  # [n]
    cols = t.slot_col.index_select(0, slots)  # [n, K]
    code = t.slot_code.index_select(0, slots)  # [n, K]
    coef = t.slot_coef.index_select(0, slots)  # [n, K, 3]
    params = F.embedding(cols, t.params)  # [n, K, P]
    res = residual.index_select(0, rows)  # [n, d]

    applies = code != NO_OP  # [n, K]
    gate.when(
        flags.positions,
        lambda: applies.copy_(
            position_gate(
                code,
                t.slot_last_n.index_select(0, slots),
                step.token_pos.index_select(0, rows),
                step.prompt_len.index_select(0, slots),
            )
        ),
    )
    x = torch.empty(n, d, dtype=torch.float32, device=device)  # [n, d] residual stream after the layer
    gate.when(flags.x, lambda: torch.add(hidden.index_select(0, rows).float(), res.float(), out=x))
    scales = neutral_scales(n, k, device)
    gate.when(flags.norm, lambda: copy_scales(scales, token_sigma(x, params)))
    read = torch.zeros(n, k, dtype=torch.float32, device=device)  # [n, K] a·f
    gate.when(flags.read, lambda: read.copy_(read_term(lane_dots(x, t.enc, cols), coef, params, scales)))
    holds = torch.ones(n, k, dtype=torch.bool, device=device)  # [n, K]
    gate.when(flags.cond, lambda: holds.copy_(lane_conditions(rt, x, slots, gate)))
    norm_add = torch.zeros(n, k, dtype=torch.float32, device=device)  # [n, K]
    gate.when(flags.bn, lambda: norm_add.copy_(norm_add_term(x, coef, params)))
    applied = applies & holds
    c = combine(coef, params, applied, read, scales.sigma_out, norm_add)  # [n, K]
    # Σ_k c·dec[col] without materialising [n, K, d]; coefficients rounded to the bank's dtype as in the eager
    # op's GEMM.
    delta = F.embedding_bag(cols, t.dec, per_sample_weights=c.to(t.dec.dtype), mode="sum")  # [n, d]
    steered = applied.any(dim=-1)  # [n]
    # One rounding to the residual's dtype (its add computes in float32); a bank of another dtype adds in float32.
    new = res + delta if delta.dtype == res.dtype else (res.float() + delta.float()).to(res.dtype)
    out.index_copy_(0, rows, torch.where(steered[:, None], new, res))  # rows no entry applies to: bit for bit
    if padded:
        real = torch.diff(rows, prepend=rows[:1] - 1) > 0  # [n] live lanes (padding repeats the last row)
        applied = applied & real[:, None]
    t.op_counts.index_add_(0, t.slot_op.index_select(0, slots).flatten(), applied.flatten().long())
    rt.probe[1].copy_(delta[0].float() * (steered[0] & (rows[0] == 0)))  # lane 0 is row 0 if row 0 is steered


def neutral_scales(n: int, k: int, device: torch.device) -> TokenScales:
    """What token_sigma gives when no entry's SAE normalises: 1 in, 1 out, mean 0."""
    ones = torch.ones(2, n, k, dtype=torch.float32, device=device)
    return TokenScales(ones[0], ones[1], torch.zeros(n, 1, dtype=torch.float32, device=device))


def copy_scales(dst: TokenScales, src: TokenScales) -> None:
    for a, b in zip(dst, src):
        a.copy_(b)


def lane_conditions(rt: LayerRuntime, x: torch.Tensor, slots: torch.Tensor, gate: Gate) -> torch.Tensor:
    """[n, K] bool: each entry's condition (`when`) holds on its lane, or it has none."""
    t = rt.tables
    cond = Conditions(
        t.slot_cond_col.index_select(0, slots),
        t.slot_cond_thr.index_select(0, slots),
        t.slot_cond_sign.index_select(0, slots),
    )  # [n, K] each
    params = F.embedding(cond.cols, t.params)  # [n, K, P]
    scales = neutral_scales(*cond.cols.shape, x.device)
    gate.when(t.flags.norm, lambda: copy_scales(scales, token_sigma(x, params)))
    return condition_holds(lane_dots(x, t.enc, cond.cols), params, cond, scales)


def copy_observed(rt: LayerRuntime, hidden: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> None:
    """capture[rows] = the steered residual of the observed rows [n] (padding lanes copy a live row again)."""
    rt.capture.index_copy_(0, rows, hidden.index_select(0, rows).float() + out.index_select(0, rows).float())


def apply_fixed_shape(rt: LayerRuntime, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The steered residual [T, d]: only the live bucket's lanes are computed; other rows are copied."""
    num_tokens = residual.shape[0]
    out = residual.clone()
    gate = gate_for_call()
    if gate is not None:
        try:
            run_lanes(
                rt.step.lanes,
                num_tokens,
                gate,
                lambda rows: steer_lanes(rt, hidden, residual, out, rows, gate),
            )
        except ConditionalsUnavailable as err:
            disable_conditionals(str(err))
            gate = None
    if gate is None:  # capturing without conditional nodes: every row, each reading its own slot's plan
        apply_ungated(rt, hidden, residual, out)
        return out
    if rt.observed is not None:
        run_lanes(rt.observed, num_tokens, gate, lambda rows: copy_observed(rt, hidden, out, rows))
    return out


def apply_ungated(rt: LayerRuntime, hidden: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    """Every row as a lane (unsteered rows hold the empty NULL plan and stay bit for bit); every observed-layer
    row copied out (no row index that a replay could find stale)."""
    num_tokens = residual.shape[0]
    rows = torch.arange(num_tokens, device=residual.device)  # [T]
    steer_lanes(rt, hidden, residual, out, rows, ALWAYS, padded=False)
    if rt.observed is not None:
        rt.capture[:num_tokens].copy_(hidden.float() + out.float())


def warm_up(rt: LayerRuntime) -> None:
    """Run the branch body once outside any capture (one row of zeros, NULL plan: nothing changes), so that
    every kernel it launches is loaded before a graph records it."""
    d = rt.tables.dec.shape[1]
    device = rt.tables.dec.device
    zeros = torch.zeros(1, d, dtype=rt.tables.dec.dtype, device=device)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    probe = rt.probe[1].clone()
    slot = rt.step.token_slot[:1].clone()
    rt.step.token_slot[:1].fill_(rt.step.null_slot)
    steer_lanes(rt, zeros, zeros, zeros.clone(), rows, ALWAYS, padded=False)
    if rt.observed is not None:
        copy_observed(rt, zeros, zeros, rows)
        rt.capture[:1].zero_()
    rt.step.token_slot[:1].copy_(slot)
    rt.probe[1].copy_(probe)
