"""Which request holds which slot, and the per-step write of token metadata (host side, once for all layers).

In steady decoding (the same requests with the same steering as the last step) a step writes only token_slot
and token_pos. A request that enters or changes its steering takes a slot and writes its plans at the layers it
steers; a request that leaves the batch gives its slot back, emptying those layers' rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import LayerPlan, LayerTables, WorkingSetFull

PlanLookup = Callable[[str, object], dict[int, LayerPlan]]  # (request id, wire) -> plans by layer ({}: none)


class SlotPlanner:
    def __init__(
        self,
        step: StepMetadata,
        tables: dict[int, LayerTables],
        on_capacity: Callable[[str, Exception], None],
        on_release: Callable[[str], None] = lambda req_id: None,
    ):
        self.step = step
        self.tables = tables
        self.on_capacity = on_capacity  # a request whose plans do not fit the working set (it runs unsteered)
        self.on_release = on_release  # a request's slot is back and its rows emptied (after the table writes)
        self._slot_wire: dict[str, object] = {}  # request id -> the wire its slot was written from
        self._slot_layers: dict[int, list[int]] = {}  # slot -> layers where its plan is not empty
        self._last_batch: tuple[list[str], list] | None = None  # (req_ids, wires) of the last write
        self._last_row_slots = np.zeros(0, dtype=np.int64)
        self._refused: set[str] = set()  # requests whose plans did not fit: unsteered for as long as they run

    def write_step(
        self,
        req_ids: list[str],
        wires: list,
        num_prompt: np.ndarray,
        query_start: np.ndarray,
        num_computed: np.ndarray,
        plans_of: PlanLookup,
    ) -> int:
        """Metadata for the coming forward; returns the number of token rows of steered requests."""
        if self._last_batch is not None and self._last_batch == (req_ids, wires):
            row_slots = self._last_row_slots  # steady decode: nothing but positions changes
        else:
            row_slots = self._assign(req_ids, wires, num_prompt, plans_of)
            self._last_batch = (list(req_ids), list(wires))
            self._last_row_slots = row_slots
        self.step.write(row_slots, query_start, num_computed)
        return int(self.step.steered_rows_host.size)

    def _assign(self, req_ids, wires, num_prompt, plans_of: PlanLookup) -> np.ndarray:
        step = self.step
        live = set(req_ids)
        leaving = [r for r in step.slot_of if r not in live]
        self._refused &= live
        row_slots = np.full(len(req_ids), step.null_slot, dtype=np.int64)  # [R]
        entering = []
        for i, (req_id, wire) in enumerate(zip(req_ids, wires)):
            if req_id in step.slot_of:
                if self._slot_wire[req_id] == wire:
                    row_slots[i] = step.slot_of[req_id]
                    continue
                leaving.append(req_id)  # its steering changed
            if wire is not None and req_id not in self._refused:
                entering.append(i)
        self.release_many(leaving)  # before any new plan is made: a plan may reuse what these free
        newcomers: list[tuple[int, str, object, int, dict[int, LayerPlan]]] = []
        for i in entering:
            plans = plans_of(req_ids[i], wires[i])
            if plans:
                newcomers.append((i, req_ids[i], wires[i], int(num_prompt[i]), plans))
        for i, slot in self._take_many(newcomers, plans_of):
            row_slots[i] = slot
        return row_slots

    def _take_many(self, newcomers, plans_of: PlanLookup) -> list[tuple[int, int]]:
        """Slots for all newcomers, their plans written with one table write per layer."""
        if not newcomers:
            return []
        by_layer: dict[int, tuple[list[int], list[LayerPlan]]] = {}
        taken = []
        slots_taken = self.step.acquire_many([n[1] for n in newcomers], [n[3] for n in newcomers])
        for (i, req_id, wire, _, plans), slot in zip(newcomers, slots_taken):
            self._slot_wire[req_id] = wire
            self._slot_layers[slot] = list(plans)
            for layer, plan in plans.items():
                slots, layer_plans = by_layer.setdefault(layer, ([], []))
                slots.append(slot)
                layer_plans.append(plan)
            taken.append((i, slot))
        try:
            for layer, (slots, layer_plans) in by_layer.items():
                self.tables[layer].write_slots(slots, layer_plans)
        except WorkingSetFull:  # not all fit: back out, then admit one at a time (the rest run unsteered)
            self.release_many([req_id for _, req_id, *_ in newcomers])
            # Plans again: releasing may have dropped rows a plan held (inline vectors).
            return [
                (i, self.take(req_id, wire, prompt_len, plans_of(req_id, wire) or {}))
                for i, req_id, wire, prompt_len, _ in newcomers
            ]
        return taken

    def take(self, req_id: str, wire: object, prompt_len: int, plans: dict[int, LayerPlan]) -> int:
        """A slot for req_id with these plans (null_slot if they do not fit: reported, run unsteered)."""
        slot = self.step.acquire(req_id, prompt_len)
        self._slot_wire[req_id] = wire
        self._slot_layers[slot] = list(plans)
        try:
            for layer, plan in plans.items():
                self.tables[layer].set_slot(slot, plan)
        except WorkingSetFull as err:
            self.release(req_id)
            self._refused.add(req_id)  # never steered halfway through its output
            self.on_capacity(req_id, err)
            return self.step.null_slot
        return slot

    def release(self, req_id: str) -> None:
        self.release_many([req_id])

    def release_many(self, req_ids: list[str]) -> None:
        """Give these requests' slots back, emptying their rows with one table write per layer."""
        by_layer: dict[int, list[int]] = {}
        for req_id in req_ids:
            slot = self.step.release(req_id)
            del self._slot_wire[req_id]
            for layer in self._slot_layers.pop(slot, []):
                by_layer.setdefault(layer, []).append(slot)
        for layer, slots in by_layer.items():
            self.tables[layer].write_slots(slots, [None] * len(slots))
        for req_id in req_ids:
            self.on_release(req_id)

    def forget_batch(self) -> None:
        """The next step assigns slots afresh (a slot was given back outside a step)."""
        self._last_batch = None

    def clear(self) -> None:
        """Every slot back, every row and table "no steering"."""
        self.release_many(list(self.step.slot_of))
        self._last_batch = None
        self._refused.clear()
        self.step.disarm()
