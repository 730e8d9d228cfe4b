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
from steer_plugin.engine.gate import Flag, flags_of
from steer_plugin.engine.step import copy_rows, device_mirror
from steer_plugin.request.ops import OP_NAMES as REQUEST_OP_NAMES
from steer_plugin.request.ops import POSITION_CODES

logger = logging.getLogger("steer_plugin")

OP_NAMES = (*REQUEST_OP_NAMES, "selftest")  # the ops requests name, and the start-up self-test's
NO_OP = -1  # position code of an unused operation entry
UNUSED_OP_BIN = len(OP_NAMES)  # op-count bin of unused entries (never reported)


class LayerPlan(NamedTuple):
    """One request's operations at one layer."""

    bank_rows: np.ndarray  # [m] int64
    coef: np.ndarray  # [m, 3] float32 (a, b, bn)
    positions: np.ndarray  # [m] int8 position codes
    last_n: np.ndarray  # [m] int64
    op_codes: np.ndarray  # [m] int8 index into OP_NAMES
    # `when`: op k applies only where bank row cond_rows[k]'s feature is above (cond_sign 1) / below (-1)
    # cond_thr[k]; cond_sign 0 (or None): always.
    cond_rows: np.ndarray | None = None  # [m] int64 (-1: none)
    cond_thr: np.ndarray | None = None  # [m] float32
    cond_sign: np.ndarray | None = None  # [m] int8

    def conditions(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, thresholds, signs) of the first m ops, zeros where an op has no condition."""
        if self.cond_sign is None:
            return np.full(m, -1, np.int64), np.zeros(m, np.float32), np.zeros(m, np.int64)
        sign = self.cond_sign[:m].astype(np.int64)
        return np.where(sign != 0, self.cond_rows[:m], -1), self.cond_thr[:m], sign


class _Entries(NamedTuple):
    """The operation entries of several plans, flattened: entry e is op `op_index[e]` of the plan written to
    slot number `slot_index[e]` (an index into the slots being written)."""

    slot_index: np.ndarray  # [E] int64
    op_index: np.ndarray  # [E] int64
    rows: np.ndarray  # [E] int64 bank row
    coef: np.ndarray  # [E, 3] float32
    positions: np.ndarray  # [E] position codes
    last_n: np.ndarray  # [E] int64
    op_codes: np.ndarray  # [E] OP_NAMES index
    cond_rows: np.ndarray  # [E] int64 bank row of the condition's feature (-1: none)
    cond_thr: np.ndarray  # [E] float32
    cond_sign: np.ndarray  # [E] int64 (0: none)
    first: np.ndarray  # [P] int64 first entry of each plan with entries
    cols: np.ndarray | None = None  # [E] working-set columns, once assigned
    cond_cols: np.ndarray | None = None  # [E]

    @classmethod
    def of(cls, plans: list[LayerPlan | None], sizes: list[int]) -> _Entries | None:
        used = [(i, plan, m) for i, (plan, m) in enumerate(zip(plans, sizes)) if m]
        if not used:
            return None
        counts = np.array([m for _, _, m in used], dtype=np.int64)  # [P]
        total = int(counts.sum())
        first = np.cumsum(counts) - counts
        cond_rows = np.full(total, -1, np.int64)
        cond_thr = np.zeros(total, np.float32)
        cond_sign = np.zeros(total, np.int64)
        for (_, plan, m), start in zip(used, first.tolist()):
            if plan.cond_sign is not None:  # rare: per plan only where a `when` exists
                cond_rows[start : start + m], cond_thr[start : start + m], cond_sign[start : start + m] = (
                    plan.conditions(m)
                )
        return cls(
            slot_index=np.repeat(np.array([i for i, _, _ in used], dtype=np.int64), counts),
            op_index=np.arange(total, dtype=np.int64) - np.repeat(first, counts),
            rows=np.concatenate([plan.bank_rows[:m] for _, plan, m in used]).astype(np.int64),
            coef=np.concatenate([plan.coef[:m] for _, plan, m in used]),
            positions=np.concatenate([plan.positions[:m] for _, plan, m in used]),
            last_n=np.concatenate([plan.last_n[:m] for _, plan, m in used]),
            op_codes=np.concatenate([plan.op_codes[:m] for _, plan, m in used]),
            cond_rows=cond_rows,
            cond_thr=cond_thr,
            cond_sign=cond_sign,
            first=first,
        )

    def rows_in_plan_order(self) -> np.ndarray:
        """Every row the entries use: each plan's op rows, then the rows its conditions read."""
        if not (self.cond_rows >= 0).any():
            return self.rows
        parts = []
        for start, end in zip(self.first.tolist(), [*self.first[1:].tolist(), len(self.rows)]):
            cond = self.cond_rows[start:end]
            parts += [self.rows[start:end], cond[cond >= 0]]
        return np.concatenate(parts)


class GateFlags(NamedTuple):
    """Device flags (with host copies) of the terms some live slot needs (see DeltaTerms)."""

    x: Flag  # any of the four below: the op reads the residual stream after the layer
    read: Flag
    norm: Flag
    bn: Flag
    cond: Flag
    positions: Flag  # a position rule other than "all"


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
        self.slot_cond_col_host = host((slots, max_ops), torch.int64)  # [S+1, K] condition's column
        self.slot_cond_thr_host = host((slots, max_ops), torch.float32)  # [S+1, K]
        self.slot_cond_sign_host = host((slots, max_ops), torch.int64)  # [S+1, K] 1 above, -1 below, 0 none
        self.slot_col = device_mirror(self.slot_col_host, device)
        self.slot_coef = device_mirror(self.slot_coef_host, device)
        self.slot_code = device_mirror(self.slot_code_host, device)
        self.slot_last_n = device_mirror(self.slot_last_n_host, device)
        self.slot_op = device_mirror(self.slot_op_host, device)
        self.slot_cond_col = device_mirror(self.slot_cond_col_host, device)
        self.slot_cond_thr = device_mirror(self.slot_cond_thr_host, device)
        self.slot_cond_sign = device_mirror(self.slot_cond_sign_host, device)
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
        self._enc_copied = np.zeros(capacity, dtype=bool)  # column's encoder row copied (only read ones are)
        self._free = list(range(capacity))  # min-heap: low columns first keeps `width` small
        self.width = 0  # columns [0, width) may be live: what the eager op multiplies over
        # Live slots whose plan needs: a feature read (clamp, scale, ablate), a normalised add (bn), a position
        # rule other than "all", a condition (`when`); and live columns whose SAE normalises or centres its input.
        self._slot_flags = np.zeros((slots, 4), dtype=np.int64)
        self._flag_counts = np.zeros(4, dtype=np.int64)
        self._norm_columns = 0
        # The same flags (`terms`, `position_rules`) as device flags: the fixed-shape op gates each term of the
        # formula on them (gate.py). Written when slots change hands, never per step.
        self.gates_host = host((len(GateFlags._fields),), torch.bool, False)
        self.gates = device_mirror(self.gates_host, device)
        self.flags = GateFlags(*flags_of(self.gates, self.gates_host))

    def bank_rows_changed(self) -> None:
        """The bank's rows were rewritten (a runtime load): refresh what is derived from them. Rows a
        working-set column holds are never rewritten (see RuntimeLoads)."""
        bank = self.bank
        self._bank_norm = ((bank.params[:, NORM_KIND] != 0) | (bank.params[:, CENTER] != 0)).cpu().numpy()

    def uses_rows(self, offset: int, size: int) -> bool:
        """Whether a working-set column holds a copy of any bank row in [offset, offset + size)."""
        live = self._row_of_col[self._row_of_col >= 0]
        return bool(((live >= offset) & (live < offset + size)).any())

    def slots_using_rows(self, slots: list[int], offset: int, size: int) -> list[int]:
        """Those of `slots` whose plan here reads or writes a bank row in [offset, offset + size), read from the
        tables themselves (not from cached plans, which an earlier unload may have dropped)."""
        if not slots:
            return []
        at = np.asarray(slots, dtype=np.int64)
        live = self.slot_code_host.numpy()[at] != NO_OP  # [n, K]
        cond = live & (self.slot_cond_sign_host.numpy()[at] != 0)
        rows = self._row_of_col[self.slot_col_host.numpy()[at]]
        cond_rows = self._row_of_col[self.slot_cond_col_host.numpy()[at]]
        hit = (live & (rows >= offset) & (rows < offset + size)).any(1)
        hit |= (cond & (cond_rows >= offset) & (cond_rows < offset + size)).any(1)
        return [slot for slot, used in zip(slots, hit.tolist()) if used]

    # --- writes when a slot changes hands ------------------------------------------------------------------

    def set_slot(self, slot: int, plan: LayerPlan | None) -> None:
        """Replace slot's plan at this layer (None: no operations)."""
        self.write_slots([slot], [plan])

    def write_slots(self, slots: list[int], plans: list[LayerPlan | None]) -> None:
        """Replace several slots' plans at once (None: no operations): array writes over all entries at once and
        one device copy per table, whatever the number of slots. If the new plans need more working-set rows
        than are free, every one of these slots is left empty and WorkingSetFull is raised."""
        slots_np = np.asarray(slots, dtype=np.int64)
        code_h, col_h = self.slot_code_host.numpy(), self.slot_col_host.numpy()
        live_h = code_h[slots_np] != NO_OP
        cond_live = live_h & (self.slot_cond_sign_host.numpy()[slots_np] != 0)
        self._unref_many(
            np.concatenate([col_h[slots_np][live_h], self.slot_cond_col_host.numpy()[slots_np][cond_live]])
        )
        sizes = [0 if plan is None else len(plan.bank_rows) for plan in plans]
        if (
            max(sizes, default=0) > self.max_ops
        ):  # requests are validated against this; never crash the engine
            logger.error(
                "steering: more than %d ops at layer %d; extra ops dropped", self.max_ops, self.bank.layer
            )
            sizes = [min(m, self.max_ops) for m in sizes]
        entries = _Entries.of(plans, sizes)
        if entries is None:  # slots handed back: just empty their rows
            self._write_tables(slots_np, None)
            return
        # New rows take columns in plan order (each plan's op rows, then the rows its conditions read), so each
        # request's columns stay together: the eager op can then multiply per block of requests.
        order = entries.rows_in_plan_order()
        unique_rows, first = np.unique(order, return_index=True)
        missing = [r for r in order[np.sort(first)].tolist() if r not in self._col_of_row]
        if len(missing) > len(self._free):
            self._write_tables(slots_np, None)
            raise WorkingSetFull(
                f"layer {self.bank.layer}: {len(missing)} more working-set rows needed, {len(self._free)} free "
                f"of {self.capacity} (raise limits.working_set_rows)"
            )
        if missing:
            new_cols = [heapq.heappop(self._free) for _ in missing]
            for row, col in zip(missing, new_cols):
                self._col_of_row[row] = col
            self._row_of_col[new_cols] = missing
            self._enc_copied[new_cols] = False
            src = torch.tensor(missing, device=self.dec.device)
            dst = torch.tensor(new_cols, device=self.dec.device)
            # index_select + index_copy_: a third faster than advanced-index assignment on the CPU build.
            self.dec.index_copy_(0, dst, self.bank.dec.index_select(0, src))
            self.params.index_copy_(0, dst, self.bank.params.index_select(0, src))
            self.width = max(self.width, max(new_cols) + 1)
            self._norm_columns += int(self._bank_norm[missing].sum())
        unique_cols = np.array([self._col_of_row[r] for r in unique_rows.tolist()], dtype=np.int64)
        op_cols = unique_cols[np.searchsorted(unique_rows, entries.rows)]  # [E]
        has_cond = entries.cond_rows >= 0  # [E]
        cond_cols = np.zeros_like(op_cols)
        cond_cols[has_cond] = unique_cols[np.searchsorted(unique_rows, entries.cond_rows[has_cond])]
        np.add.at(self._refs, np.concatenate([op_cols, cond_cols[has_cond]]), 1)
        # Encoder rows are copied only for columns something reads (a clamp, scale or ablate; a condition):
        # adds and vectors never read theirs, and the encoder copy is the larger one (float32).
        reads = np.unique(np.concatenate([op_cols[entries.coef[:, 0] != 0], cond_cols[has_cond]]))
        self._copy_encoder_rows(reads[~self._enc_copied[reads]])
        self._write_tables(slots_np, entries._replace(cols=op_cols, cond_cols=cond_cols))

    def _copy_encoder_rows(self, cols: np.ndarray) -> None:
        if not cols.size:
            return
        src = torch.from_numpy(self._row_of_col[cols]).to(self.enc.device)
        dst = torch.from_numpy(cols).to(self.enc.device)
        self.enc.index_copy_(0, dst, self.bank.enc.index_select(0, src).float())
        self._enc_copied[cols] = True

    def _write_tables(self, slots: np.ndarray, entries: _Entries | None) -> None:
        """Write the slots' rows of every table: the entries' values, "no operation" everywhere else."""
        n, k = len(slots), self.max_ops
        col = np.zeros((n, k), np.int64)
        coef = np.zeros((n, k, 3), np.float32)
        code = np.full((n, k), NO_OP, np.int64)
        last_n = np.zeros((n, k), np.int64)
        op = np.full((n, k), UNUSED_OP_BIN, np.int64)
        cond_col = np.zeros((n, k), np.int64)
        cond_thr = np.zeros((n, k), np.float32)
        cond_sign = np.zeros((n, k), np.int64)
        if entries is not None:
            at = (entries.slot_index, entries.op_index)  # [E], [E]
            col[at] = entries.cols
            coef[at] = entries.coef
            code[at] = entries.positions
            last_n[at] = entries.last_n
            op[at] = entries.op_codes
            cond_col[at] = entries.cond_cols
            cond_thr[at] = entries.cond_thr
            cond_sign[at] = entries.cond_sign
        live = code != NO_OP
        flags = np.stack(
            [
                (live & (coef[..., 0] != 0)).any(1),
                (live & (coef[..., 2] != 0)).any(1),
                (live & (code != POSITION_CODES["all"])).any(1),
                (live & (cond_sign != 0)).any(1),
            ],
            axis=1,
        ).astype(np.int64)  # [n, 4]
        self._flag_counts += flags.sum(0) - self._slot_flags[slots].sum(0)
        self._slot_flags[slots] = flags
        self._write_gates()
        tables = (
            (self.slot_col, self.slot_col_host, col),
            (self.slot_coef, self.slot_coef_host, coef),
            (self.slot_code, self.slot_code_host, code),
            (self.slot_last_n, self.slot_last_n_host, last_n),
            (self.slot_op, self.slot_op_host, op),
            (self.slot_cond_col, self.slot_cond_col_host, cond_col),
            (self.slot_cond_thr, self.slot_cond_thr_host, cond_thr),
            (self.slot_cond_sign, self.slot_cond_sign_host, cond_sign),
        )
        for dev, host, values in tables:
            host.numpy()[slots] = values
            copy_rows(dev, host, slots)

    def _write_gates(self) -> None:
        terms = self.terms
        want = [terms.needs_x, terms.read, terms.norm, terms.bn, terms.cond, self.position_rules]
        gates = self.gates_host.numpy()
        if gates.tolist() != want:
            gates[:] = want
            copy_rows(self.gates, self.gates_host, list(range(len(want))))

    def _unref_many(self, cols: np.ndarray) -> None:
        if not cols.size:
            return
        np.subtract.at(self._refs, cols, 1)
        touched = np.unique(cols)
        freed = touched[self._refs[touched] == 0]
        if not freed.size:
            return
        rows = self._row_of_col[freed]
        for row in rows.tolist():
            del self._col_of_row[row]
        self._norm_columns -= int(self._bank_norm[rows].sum())
        self._row_of_col[freed] = -1
        self._enc_copied[freed] = False
        for col in freed.tolist():
            heapq.heappush(self._free, col)
        self.dec[torch.from_numpy(freed).to(self.dec.device)] = 0  # a free column adds exactly nothing
        if int(freed.max()) + 1 == self.width:
            live = np.flatnonzero(self._row_of_col >= 0)
            self.width = int(live[-1]) + 1 if live.size else 0

    @property
    def terms(self) -> DeltaTerms:
        """The formula's parts that some live slot needs (the eager op skips the rest)."""
        reads, bn, _, cond = self._flag_counts.tolist()
        return DeltaTerms(read=reads > 0, norm=self._norm_columns > 0, bn=bn > 0, cond=cond > 0)

    @property
    def position_rules(self) -> bool:
        """Some live slot steers only some positions (prompt, generation, last prompt tokens)."""
        return bool(self._flag_counts[2])

    def counts_by_op(self) -> dict[str, int]:
        return dict(zip(OP_NAMES, self.op_counts.tolist()[: len(OP_NAMES)]))

    def nbytes(self) -> int:
        tensors = (
            self.slot_col,
            self.slot_coef,
            self.slot_code,
            self.slot_last_n,
            self.slot_op,
            self.slot_cond_col,
            self.slot_cond_thr,
            self.slot_cond_sign,
        )
        return sum(t.numel() * t.element_size() for t in (*tensors, self.enc, self.dec, self.params))
