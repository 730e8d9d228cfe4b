"""Per-step token metadata, written once per forward and read by every steered layer (vLLM's punica design).

Each steered request holds a slot for as long as it is scheduled. A step writes only two small vectors:
token_slot[t] (the slot of the request that owns token row t) and token_pos[t] (its position). Rows of
unsteered requests, padding rows and rows past the prepared batch hold NULL_SLOT, whose plan is empty at every
layer, so they are "no steering" by construction. Per-slot data (prompt length here, the per-layer plans in
tables.py) is written only when a slot changes hands.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from steer_plugin.engine.lanes import Lanes


def device_mirror(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor the op reads: the host tensor itself on CPU, a copy with a fixed address on a device."""
    return host if device.type == "cpu" else host.to(device)


def copy_rows(mirror: torch.Tensor, host: torch.Tensor, rows) -> None:
    """Copy these rows of a host tensor into its device mirror, synchronously (the host rows are reused)."""
    if mirror is host:
        return
    index = torch.as_tensor(rows)
    mirror[index.to(mirror.device)] = host[index].to(mirror.device)


class StepMetadata:
    """token_slot / token_pos for up to max_tokens rows and prompt lengths for max_slots slots (+ NULL_SLOT)."""

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device):
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.null_slot = max_slots  # the last slot row: empty plans everywhere
        pin = device.type == "cuda"
        self.token_slot_host = torch.full((max_tokens,), self.null_slot, dtype=torch.int64, pin_memory=pin)
        self.token_pos_host = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)  # [M]
        self.prompt_len_host = torch.zeros(max_slots + 1, dtype=torch.int64, pin_memory=pin)  # [S + 1]
        self._prompt_len_np = self.prompt_len_host.numpy()
        self.token_slot = device_mirror(self.token_slot_host, device)  # [M] read by the op
        self.token_pos = device_mirror(self.token_pos_host, device)  # [M]
        self.prompt_len = device_mirror(self.prompt_len_host, device)  # [S + 1]
        self.num_tokens = 0  # rows written by the last write() (host int; 0 = disarmed)
        self.steered_rows_host = np.zeros(0, dtype=np.int64)  # rows of steered requests this step, ascending
        # The steered rows as lanes for the fixed-shape op (persistent, padded, gated; see lanes.py).
        self.lanes = Lanes(max_tokens, device)
        self.steered_rows = self.lanes.live()  # [n] their device copy (eager op): a view of the lanes
        self._extent = 0  # rows [0, extent) may hold a slot other than NULL on the device
        self._copied = torch.cuda.Event() if device.type == "cuda" else None  # host rows reusable after it
        self._free = list(range(max_slots))  # min-heap: low slots first keeps the tables compact
        self.slot_of: dict[str, int] = {}  # request id -> slot

    # --- slots ---------------------------------------------------------------------------------------------

    def acquire(self, req_id: str, prompt_len: int) -> int:
        return self.acquire_many([req_id], [prompt_len])[0]

    def acquire_many(self, req_ids: list[str], prompt_lens: list[int]) -> list[int]:
        """A free slot for each request (lowest first), with its prompt length written once."""
        slots = [heapq.heappop(self._free) for _ in req_ids]
        self.slot_of.update(zip(req_ids, slots))
        self._prompt_len_np[slots] = prompt_lens
        copy_rows(self.prompt_len, self.prompt_len_host, slots)
        return slots

    def release(self, req_id: str) -> int:
        slot = self.slot_of.pop(req_id)
        heapq.heappush(self._free, slot)
        return slot

    # --- per step ------------------------------------------------------------------------------------------

    def write(self, row_slots: np.ndarray, query_start: np.ndarray, num_computed: np.ndarray) -> None:
        """row_slots [R]: each request's slot (null_slot when unsteered); query_start [R + 1]; num_computed [R]."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's async copies still read the pinned host rows
        num_tokens = int(query_start[-1]) if len(query_start) else 0
        counts = np.diff(query_start)  # [R]
        slots_np = self.token_slot_host.numpy()
        pos_np = self.token_pos_host.numpy()
        token_slot = np.repeat(row_slots, counts)  # [T]
        slots_np[:num_tokens] = token_slot
        slots_np[num_tokens : max(self._extent, num_tokens)] = self.null_slot
        self.steered_rows_host = np.flatnonzero(token_slot != self.null_slot)
        self.lanes.write(self.steered_rows_host, num_tokens)
        self.steered_rows = self.lanes.live()
        # position of row t = num_computed[r] + (t - query_start[r])
        pos_np[:num_tokens] = np.arange(num_tokens) + np.repeat(num_computed - query_start[:-1], counts)
        self._sync(max(self._extent, num_tokens), num_tokens)
        self.num_tokens = num_tokens

    def disarm(self) -> None:
        """Every row back to NULL_SLOT: a forward that skips preparation (warm-up, profile and dummy runs,
        idle data-parallel ranks, a graph replayed without a prepare) steers nothing."""
        if self._copied is not None:
            self._copied.synchronize()
        extent = max(self._extent, self.num_tokens)
        self.token_slot_host.numpy()[:extent] = self.null_slot
        if self.token_slot is not self.token_slot_host and extent:
            self.token_slot[:extent].fill_(self.null_slot)
        self._extent = 0
        self.num_tokens = 0
        self.steered_rows_host = np.zeros(0, dtype=np.int64)
        self.lanes.clear()
        self.steered_rows = self.lanes.live()

    def _sync(self, extent: int, num_tokens: int) -> None:
        if self.token_slot is not self.token_slot_host:
            self.token_slot[:extent].copy_(self.token_slot_host[:extent], non_blocking=True)
            self.token_pos[:num_tokens].copy_(self.token_pos_host[:num_tokens], non_blocking=True)
            self._copied.record()
        self._extent = num_tokens
