"""Persistent per-layer steering tables: each slot's plan and the layer's working set of bank rows.

A slot's plan (up to max_ops operations) is written when a request takes or leaves the slot, never per step.
Operations name columns of the working set, a compact copy of the bank rows that some live slot uses (encoder
rows in float32 for exact feature reads, decoder rows in the bank's dtype, per-row constants), so the op is two
skinny GEMMs over `width` columns instead of a gather of K rows per token. Slot row NULL (the last) and unused
operation entries have code NO_OP: they never apply. The device copies have fixed addresses (CUDA graphs).
"""

from __future__ import annotations

import heapq
import logging
from typing import NamedTuple

import numpy as np
import torch

from steer_plugin.engine.bank import CENTER, NORM_KIND, LayerBank
from steer_plugin.engine.delta import DeltaTerms
from steer_plugin.spec import POSITION_CODES

logger = logging.getLogger("steer_plugin")

OP_NAMES = ("add", "clamp", "scale", "ablate", "vector", "selftest")
NO_OP = -1  # position code of an unused operation entry
UNUSED_OP_BIN = len(OP_NAMES)  # op-count bin of unused entries (never reported)


class LayerPlan(NamedTuple):
    """One request's operations at one layer."""

    bank_rows: np.ndarray  # [m] int64
    coef: np.ndarray  # [m, 3] float32 (a, b, bn)
    positions: np.ndarray  # [m] int8 position codes
    last_n: np.ndarray  # [m] int64
    op_codes: np.ndarray  # [m] int8 index into OP_NAMES

    @property
    def reads_features(self) -> bool:
        return bool((self.coef[:, 0] != 0).any())


class WorkingSetFull(RuntimeError):
    """More distinct bank rows in use at one layer than its working set holds."""


class LayerTables:
    """Slot plans [S + 1, K] and the working set [capacity] of one layer, on the host and the device."""

    def __init__(self, bank: LayerBank, max_slots: int, max_ops: int, capacity: int, device: torch.device):
        self.bank = bank
        self.max_ops = max_ops
        self.capacity = capacity
        d_model = bank.dec.shape[1]
        pin = device.type == "cuda"
        slots = max_slots + 1  # + the NULL slot

        def host(shape, dtype, fill=0):
            return torch.full(shape, fill, dtype=dtype, pin_memory=pin)

        self.slot_col_host = host((slots, max_ops), torch.int64)  # [S+1, K] working-set column
        self.slot_coef_host = host((slots, max_ops, 3), torch.float32)  # [S+1, K, 3] (a, b, bn)
        self.slot_code_host = host((slots, max_ops), torch.int64, NO_OP)  # [S+1, K] position code
        self.slot_last_n_host = host((slots, max_ops), torch.int64)  # [S+1, K]
        self.slot_op_host = host((slots, max_ops), torch.int64, UNUSED_OP_BIN)  # [S+1, K] OP_NAMES index
        on_host = device.type == "cpu"
        mirror = (lambda t: t) if on_host else (lambda t: t.to(device))
        self.slot_col = mirror(self.slot_col_host)
        self.slot_coef = mirror(self.slot_coef_host)
        self.slot_code = mirror(self.slot_code_host)
        self.slot_last_n = mirror(self.slot_last_n_host)
        self.slot_op = mirror(self.slot_op_host)
        # The working set: device only, rows copied from the bank on the device when a column is taken.
        self.enc = torch.zeros(capacity, d_model, dtype=torch.float32, device=device)  # [C, d]
        self.dec = torch.zeros(capacity, d_model, dtype=bank.dec.dtype, device=device)  # [C, d]
        self.params = torch.zeros(
            capacity, bank.params.shape[1], dtype=torch.float32, device=device
        )  # [C, P]
        self.op_counts = torch.zeros(len(OP_NAMES) + 1, dtype=torch.int64, device=device)  # (token, op) pairs
        # Per bank row: does its SAE normalise or centre the input (then the op needs per-token sigma / mean)?
        self._bank_norm = ((bank.params[:, NORM_KIND] != 0) | (bank.params[:, CENTER] != 0)).cpu().numpy()
        self._col_of_row: dict[int, int] = {}  # bank row -> working-set column
        self._row_of_col = np.full(capacity, -1, dtype=np.int64)
        self._refs = np.zeros(capacity, dtype=np.int64)
        self._free = list(range(capacity))  # min-heap: low columns first keeps `width` small
        self.width = 0  # columns [0, width) may be live: what the eager op multiplies over
        # Live slots whose plan needs: a feature read (clamp, scale, ablate), a normalised add (bn), a position
        # rule other than "all"; and live columns whose SAE normalises or centres its input.
        self._slot_flags = np.zeros((slots, 3), dtype=np.int64)
        self._flag_counts = np.zeros(3, dtype=np.int64)
        self._norm_columns = 0

    # --- writes when a slot changes hands ------------------------------------------------------------------

    def set_slot(self, slot: int, plan: LayerPlan | None) -> None:
        """Replace slot's plan at this layer (None: no operations)."""
        old = self.slot_col_host.numpy()[slot][self.slot_code_host.numpy()[slot] != NO_OP]
        for col in old.tolist():
            self._unref(col)
        m = 0 if plan is None else len(plan.bank_rows)
        if m > self.max_ops:  # requests are validated against this; never crash the engine
            logger.error("steering: %d ops on one token at layer %d; extra ops dropped", m, self.bank.layer)
            m = self.max_ops
        cols = np.zeros(self.max_ops, dtype=np.int64)
        taken = 0
        try:
            for k in range(m):
                cols[k] = self._ref(int(plan.bank_rows[k]))
                taken += 1
        except WorkingSetFull:
            for col in cols[:taken].tolist():
                self._unref(col)
            self._write_slot(slot, None, np.zeros_like(cols), 0)
            raise
        self._write_slot(slot, plan, cols, m)

    def _write_slot(self, slot: int, plan: LayerPlan | None, cols: np.ndarray, m: int) -> None:
        self.slot_col_host.numpy()[slot] = cols
        coef, code, last_n, op = (
            t.numpy()[slot]
            for t in (self.slot_coef_host, self.slot_code_host, self.slot_last_n_host, self.slot_op_host)
        )
        coef[:] = 0.0
        code[:] = NO_OP
        last_n[:] = 0
        op[:] = UNUSED_OP_BIN
        if m:
            coef[:m] = plan.coef[:m]
            code[:m] = plan.positions[:m]
            last_n[:m] = plan.last_n[:m]
            op[:m] = plan.op_codes[:m]
        flags = np.array(
            [(coef[:m, 0] != 0).any(), (coef[:m, 2] != 0).any(), (code[:m] != POSITION_CODES["all"]).any()],
            dtype=np.int64,
        )
        self._flag_counts += flags - self._slot_flags[slot]
        self._slot_flags[slot] = flags
        if self.slot_col is not self.slot_col_host:
            for dev, src in (
                (self.slot_col, self.slot_col_host),
                (self.slot_coef, self.slot_coef_host),
                (self.slot_code, self.slot_code_host),
                (self.slot_last_n, self.slot_last_n_host),
                (self.slot_op, self.slot_op_host),
            ):
                dev[slot].copy_(src[slot])  # synchronous: the pinned host row is rewritten later

    def _ref(self, bank_row: int) -> int:
        col = self._col_of_row.get(bank_row)
        if col is None:
            if not self._free:
                raise WorkingSetFull(
                    f"layer {self.bank.layer}: all {self.capacity} working-set rows are in use "
                    "(raise limits.working_set_rows)"
                )
            col = heapq.heappop(self._free)
            self._col_of_row[bank_row] = col
            self._row_of_col[col] = bank_row
            self.enc[col].copy_(self.bank.enc[bank_row])
            self.dec[col].copy_(self.bank.dec[bank_row])
            self.params[col].copy_(self.bank.params[bank_row])
            self.width = max(self.width, col + 1)
            self._norm_columns += self._normalises(bank_row)
        self._refs[col] += 1
        return col

    def _unref(self, col: int) -> None:
        self._refs[col] -= 1
        if self._refs[col]:
            return
        bank_row = int(self._row_of_col[col])
        self._norm_columns -= self._normalises(bank_row)
        del self._col_of_row[bank_row]
        self._row_of_col[col] = -1
        self.dec[col].zero_()  # a free column adds exactly nothing, even through a stale coefficient
        heapq.heappush(self._free, col)
        if col + 1 == self.width:
            live = np.flatnonzero(self._row_of_col >= 0)
            self.width = int(live[-1]) + 1 if live.size else 0

    def _normalises(self, bank_row: int) -> int:
        return int(bool(self._bank_norm[bank_row]))

    @property
    def terms(self) -> DeltaTerms:
        """The formula's parts that some live slot needs (the eager op skips the rest)."""
        reads, bn, _ = self._flag_counts.tolist()
        return DeltaTerms(read=reads > 0, norm=self._norm_columns > 0, bn=bn > 0)

    @property
    def position_rules(self) -> bool:
        """Some live slot steers only some positions (prompt, generation, last prompt tokens)."""
        return bool(self._flag_counts[2])

    @property
    def reading_slots(self) -> int:
        return int(self._flag_counts[0])

    def counts_by_op(self) -> dict[str, int]:
        return dict(zip(OP_NAMES, self.op_counts.tolist()[: len(OP_NAMES)]))

    def nbytes(self) -> int:
        tensors = (self.slot_col, self.slot_coef, self.slot_code, self.slot_last_n, self.slot_op)
        return sum(t.numel() * t.element_size() for t in (*tensors, self.enc, self.dec, self.params))
