"""Persistent per-token steering tables for one layer, refilled on the host before every forward.

Row t of the tables belongs to token row t of the flattened batch. Rows that nothing steers (including
padding and warm-up rows) keep index 0 and zero coefficients with mask False, so the op leaves them exactly
as they were. The device copies have fixed addresses, which is what a captured CUDA graph needs.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch

from steer_plugin.spec import POSITION_CODES

logger = logging.getLogger(__name__)

_ALL, _PROMPT, _GENERATION, _LAST_PROMPT = (
    POSITION_CODES[k] for k in ("all", "prompt", "generation", "last_prompt_tokens")
)


OP_NAMES = ("add", "clamp", "scale", "ablate", "vector", "selftest")


class LayerPlan(NamedTuple):
    """One request's operations at one layer."""

    bank_rows: np.ndarray  # [m] int64
    coef: np.ndarray  # [m, 3] float32 (a, b, bn)
    positions: np.ndarray  # [m] int8 position codes
    last_n: np.ndarray  # [m] int64
    op_codes: np.ndarray  # [m] int8 index into OP_NAMES


class RequestSlice(NamedTuple):
    """A request's tokens in this step: rows start..start+num_tokens, positions first_position.. ."""

    start: int
    num_tokens: int
    first_position: int
    num_prompt_tokens: int
    plan: LayerPlan


def position_mask(
    positions: np.ndarray, prompt_len: int, codes: np.ndarray, last_n: np.ndarray
) -> np.ndarray:
    """Which (token, op) pairs apply. `generation` means generated tokens: position >= prompt length."""
    in_prompt = positions < prompt_len
    return (
        (codes == _ALL)
        | ((codes == _PROMPT) & in_prompt)
        | ((codes == _GENERATION) & ~in_prompt)
        | ((codes == _LAST_PROMPT) & in_prompt & (positions >= prompt_len - last_n))
    )


class LayerTables:
    """Host tables plus their device mirrors, sized for max_tokens rows and max_ops slots per row."""

    def __init__(self, max_tokens: int, max_ops: int, device: torch.device):
        self.max_tokens = max_tokens
        self.max_ops = max_ops
        pin = device.type == "cuda"
        self.idx_host = torch.zeros(max_tokens, max_ops, dtype=torch.int64, pin_memory=pin)  # [M, K]
        self.coef_host = torch.zeros(max_tokens, max_ops, 3, dtype=torch.float32, pin_memory=pin)  # [M, K, 3]
        self.mask_host = torch.zeros(max_tokens, dtype=torch.bool, pin_memory=pin)  # [M]
        self.rows_host = torch.zeros(
            max_tokens, dtype=torch.int64, pin_memory=pin
        )  # [M] steered rows, packed
        on_host = device.type == "cpu"
        self.idx = self.idx_host if on_host else torch.zeros_like(self.idx_host, device=device)
        self.coef = self.coef_host if on_host else torch.zeros_like(self.coef_host, device=device)
        self.mask = self.mask_host if on_host else torch.zeros_like(self.mask_host, device=device)
        self.rows = self.rows_host if on_host else torch.zeros_like(self.rows_host, device=device)
        self.num_rows = 0  # steered rows this step (host int, read by the op outside graph capture)
        self.op_counts = np.zeros(len(OP_NAMES), dtype=np.int64)  # steered (token, op) pairs so far, by op
        self._written_rows = np.zeros(0, dtype=np.int64)
        self._extent = 0  # rows [0, extent) may differ from zero on the device
        self._copied = torch.cuda.Event() if device.type == "cuda" else None  # host rows are reused after it

    def clear(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the last step's async copies still read the pinned host rows
        rows = self._written_rows
        if rows.size:
            self.idx_host.numpy()[rows] = 0
            self.coef_host.numpy()[rows] = 0.0
            self.mask_host.numpy()[rows] = False
        self._written_rows = np.zeros(0, dtype=np.int64)
        self.num_rows = 0

    def fill(self, slices: list[RequestSlice]) -> int:
        """Write this step's steered tokens; returns the number of steered rows."""
        self.clear()
        token_rows, op_refs = [], []
        for s in slices:
            m = len(s.plan.bank_rows)
            offsets = np.repeat(
                np.arange(s.num_tokens, dtype=np.int64), m
            )  # token-major: each token's ops in order
            ops = np.tile(np.arange(m), s.num_tokens)
            keep = position_mask(
                s.first_position + offsets, s.num_prompt_tokens, s.plan.positions[ops], s.plan.last_n[ops]
            )
            if keep.any():
                token_rows.append(s.start + offsets[keep])
                op_refs.append((s.plan, ops[keep]))
        if not token_rows:
            return 0
        rows = np.concatenate(token_rows)  # sorted: requests ascend, tokens ascend within a request
        bank_rows = np.concatenate([plan.bank_rows[ops] for plan, ops in op_refs])
        op_codes = np.concatenate([plan.op_codes[ops] for plan, ops in op_refs])
        self.op_counts += np.bincount(op_codes, minlength=len(OP_NAMES))
        coef = np.concatenate([plan.coef[ops] for plan, ops in op_refs])
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        counts = np.diff(np.r_[starts, rows.size])
        slots = np.arange(rows.size) - np.repeat(starts, counts)
        if slots.max() >= self.max_ops:  # requests are validated against this; never crash the engine
            logger.error(
                "steering: more than %d ops on one token at one layer; extra ops dropped", self.max_ops
            )
            ok = slots < self.max_ops
            rows, bank_rows, coef, slots = rows[ok], bank_rows[ok], coef[ok], slots[ok]
        unique_rows = rows[starts]
        self.idx_host.numpy()[rows, slots] = bank_rows
        self.coef_host.numpy()[rows, slots] = coef
        self.mask_host.numpy()[unique_rows] = True
        self.rows_host.numpy()[: unique_rows.size] = unique_rows
        self._written_rows = unique_rows
        self.num_rows = int(unique_rows.size)
        return self.num_rows

    def sync_to_device(self, num_tokens: int) -> None:
        """Stream-ordered copies of the rows that changed since the last step (no-op on CPU)."""
        if self.idx is self.idx_host:
            return
        extent = max(self._extent, int(self._written_rows.max()) + 1 if self._written_rows.size else 0)
        extent = min(max(extent, 0), self.max_tokens)
        if extent:
            self.idx[:extent].copy_(self.idx_host[:extent], non_blocking=True)
            self.coef[:extent].copy_(self.coef_host[:extent], non_blocking=True)
            self.mask[:extent].copy_(self.mask_host[:extent], non_blocking=True)
        if self.num_rows:
            self.rows[: self.num_rows].copy_(self.rows_host[: self.num_rows], non_blocking=True)
        self._extent = int(self._written_rows.max()) + 1 if self._written_rows.size else 0
        self._copied.record()
