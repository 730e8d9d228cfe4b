"""Which request holds which slot, and the per-step write of token metadata (host side, once for all layers).

Data flows one way, as in vLLM's punica wrapper (`update_metadata`): the planner never calls back into its
owner. Per step the owner (engine.steerer.Steerer.prepare) asks `diff` what changed since the last step; in
steady decoding (the same requests with the same steering) nothing did and `write` writes only token_slot and
token_pos. Otherwise the owner gives back the slots of the requests `diff` reports leaving (`release_many`:
each one's rows emptied at the layers it steered), compiles the plans of those entering, and `admit`s them (a
slot each, their plans written at the layers they steer); what did not fit comes back to the owner, never as a
callback. A request refused for want of working-set room stays unsteered for as long as it runs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import LayerPlan, LayerTables, WorkingSetFull


class BatchChanges(NamedTuple):
    """What changed in the batch since the last step, as `SlotPlanner.diff` reports it."""

    steady: bool  # the same requests with the same wires as the last write: only positions change
    leaving: list[str]  # requests whose slot goes back: they left the batch, or their wire changed
    entering: list[int]  # batch indices of requests with a wire, in no slot and not refused


class Newcomer(NamedTuple):
    """A request entering a slot, with its plans compiled for this worker's layers (never empty)."""

    req_id: str
    wire: object  # the message its plans were compiled from (a changed wire means new plans)
    prompt_len: int
    plans: dict[int, LayerPlan]  # layer -> its plan there


class Taken(NamedTuple):
    """The outcome of `SlotPlanner.take`."""

    slot: int  # null_slot when refused
    refused: WorkingSetFull | None  # not None: the plans did not fit, its slot is back, it runs unsteered


class SlotPlanner:
    def __init__(self, step: StepMetadata, tables: dict[int, LayerTables]):
        self.step = step
        self.tables = tables
        self._slot_wire: dict[str, object] = {}  # request id -> the wire its slot was written from
        self._slot_layers: dict[int, list[int]] = {}  # slot -> layers where its plan is not empty
        # (req_ids, wires) of the last write; None after any change to the slots (the next write rebuilds)
        self._last_batch: tuple[list[str], list] | None = None
        self._last_row_slots = np.zeros(0, dtype=np.int64)  # [R] of the last write
        self._refused: set[str] = set()  # requests whose plans did not fit: unsteered for as long as they run

    def diff(self, req_ids: list[str], wires: list) -> BatchChanges:
        """What the coming step changes; it forgets refusals of requests that left the batch."""
        if self._last_batch is not None and self._last_batch == (req_ids, wires):
            return BatchChanges(True, [], [])  # steady decode: nothing but positions changes
        self._last_batch = None
        slot_of = self.step.slot_of
        live = set(req_ids)
        leaving = [r for r in slot_of if r not in live]
        self._refused &= live
        entering = []
        for i, (req_id, wire) in enumerate(zip(req_ids, wires)):
            if req_id in slot_of:
                if self._slot_wire[req_id] == wire:
                    continue
                leaving.append(req_id)  # its steering changed: it leaves, then enters with its new plans
            if wire is not None and req_id not in self._refused:
                entering.append(i)
        return BatchChanges(False, leaving, entering)

    def admit(self, newcomers: list[Newcomer]) -> list[Newcomer]:
        """Slots for all newcomers, their plans written with one table write per layer. All or none: if they do
        not fit the working set together, every one's slot is back and they are returned (the owner then
        compiles each afresh and `take`s them one at a time)."""
        if not newcomers:
            return []
        by_layer: dict[int, tuple[list[int], list[LayerPlan]]] = {}
        slots_taken = self.step.acquire_many([n.req_id for n in newcomers], [n.prompt_len for n in newcomers])
        for n, slot in zip(newcomers, slots_taken):
            self._slot_wire[n.req_id] = n.wire
            self._slot_layers[slot] = list(n.plans)
            for layer, plan in n.plans.items():
                slots, layer_plans = by_layer.setdefault(layer, ([], []))
                slots.append(slot)
                layer_plans.append(plan)
        self._last_batch = None
        try:
            for layer, (slots, layer_plans) in by_layer.items():
                self.tables[layer].write_slots(slots, layer_plans)
        except WorkingSetFull:  # not all fit: back out (the owner admits them one at a time)
            self.release_many([n.req_id for n in newcomers])
            return list(newcomers)
        return []

    def take(self, req_id: str, wire: object, prompt_len: int, plans: dict[int, LayerPlan]) -> Taken:
        """A slot for req_id with these plans; if they do not fit, its slot is back and it is refused for as
        long as it runs (never steered halfway through its output)."""
        slot = self.step.acquire(req_id, prompt_len)
        self._slot_wire[req_id] = wire
        self._slot_layers[slot] = list(plans)
        self._last_batch = None
        try:
            for layer, plan in plans.items():
                self.tables[layer].set_slot(slot, plan)
        except WorkingSetFull as err:
            self.release_many([req_id])
            self._refused.add(req_id)
            return Taken(self.step.null_slot, err)
        return Taken(slot, None)

    def release_many(self, req_ids: list[str]) -> list[str]:
        """Give back the slots these requests hold (those in none are skipped), emptying their rows with one
        table write per layer; returns the requests whose slot went back (the owner frees what they held)."""
        by_layer: dict[int, list[int]] = {}
        released = [r for r in req_ids if r in self.step.slot_of]
        for req_id in released:
            slot = self.step.release(req_id)
            del self._slot_wire[req_id]
            for layer in self._slot_layers.pop(slot, []):
                by_layer.setdefault(layer, []).append(slot)
        for layer, slots in by_layer.items():
            self.tables[layer].write_slots(slots, [None] * len(slots))
        if released:
            self._last_batch = None  # the last row slots name a slot given back: the next step is not steady
        return released

    def write(
        self, req_ids: list[str], wires: list, query_start: np.ndarray, num_computed: np.ndarray
    ) -> int:
        """Metadata for the coming forward (after `diff` and the owner's releases and admissions); returns the
        number of token rows of steered requests."""
        if self._last_batch is None:  # the slots changed: each request's slot, null_slot when unsteered
            slot_of, null = self.step.slot_of, self.step.null_slot
            self._last_row_slots = np.array([slot_of.get(r, null) for r in req_ids], dtype=np.int64)  # [R]
            self._last_batch = (list(req_ids), list(wires))
        self.step.write(self._last_row_slots, query_start, num_computed)
        return int(self.step.steered_rows_host.size)

    def clear(self) -> list[str]:
        """Every slot back, every row and table "no steering"; returns the requests whose slot went back."""
        released = self.release_many(list(self.step.slot_of))
        self._last_batch = None
        self._refused.clear()
        self.step.disarm()
        return released
