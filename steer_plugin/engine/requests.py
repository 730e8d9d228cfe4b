"""The worker's per-request state: one record per request, in one table.

A request's wire message is decoded once per process whoever asks (the runner's step, a logits processor), by
its text; a bad one is counted once per request that carries it. Per request id, one `RequestRecord` holds what
the worker made of that message: its ops compiled for this worker's layers, its observation narrowed to this
worker's SAEs, and the inline-vector rows it holds in the banks. A reused id with another message starts a fresh
record. Compiling needs the banks, so the owner passes `compile` and `free_rows` in; the table never reaches
back into its owner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from steer_plugin.engine.bank import ScratchFull
from steer_plugin.engine.tables import LayerPlan
from steer_plugin.request.wire import ObservePlan, RequestPlan

InlineRows = list[tuple[int, int]]  # (layer, scratch row) an inline vector of the request occupies
Reject = Callable[[str, str, Exception], None]  # (kind, request id, why): counted and logged by the owner
# (request id, plan) -> its layer plans, appending the inline rows it takes to the list it is given
Compile = Callable[[str, RequestPlan, InlineRows], dict[int, LayerPlan]]
Narrow = Callable[[ObservePlan], ObservePlan]  # an observation narrowed to what this worker can read


@dataclass
class RequestRecord:
    """What this worker made of one request's message."""

    wire: object  # the message it was made from
    layer_plans: dict[int, LayerPlan] | None = None  # None: not compiled yet, or bank rows moved since
    observe: ObservePlan | None = None
    observe_known: bool = False  # `observe` was worked out (None is an answer)
    inline_rows: InlineRows = field(default_factory=list)  # held until the request's slot is released


class RequestTable:
    def __init__(self, reject: Reject, free_rows: Callable[[InlineRows], None]):
        self._reject = reject
        self._free_rows = free_rows
        self._decoded: dict[object, RequestPlan | Exception] = {}  # by wire text
        self._refused_askers: dict[object, set[str]] = {}  # bad wires: the requests already counted
        self.records: dict[str, RequestRecord] = {}

    def plan_of(self, wire: object, req_id: str | None = None) -> RequestPlan | None:
        """The decoded plan of a wire message; None (and counted) for a message we did not sign or that is out
        of range, and, given the request's id, for a plan bound to another request (the request then runs
        unsteered and unobserved, never crashing)."""
        key = _key(wire)
        if key not in self._decoded:
            try:
                self._decoded[key] = RequestPlan.decode(wire)  # signature and fields
            except Exception as err:
                self._decoded[key] = err
        plan = self._decoded[key]
        if isinstance(plan, Exception):
            # decoded once, but counted once per request that carried it (many requests can share one bad wire)
            askers = self._refused_askers.setdefault(key, set())
            if req_id is None or req_id not in askers:
                askers.add(req_id or "?")
                self._reject("steering", req_id or "?", plan)
            return None
        if req_id is not None and plan.binding is not None and not plan.binding.matches(req_id):
            self._reject(
                "steering", req_id, ValueError("steering wire: the plan is bound to another request")
            )
            return None  # a bound plan: only on its own request
        return plan

    def record(self, req_id: str, wire: object) -> RequestRecord:
        """The request's record for this message (a fresh one, its old rows given back, for another message)."""
        rec = self.records.get(req_id)
        if rec is None or rec.wire != wire:
            if rec is not None:
                self._free(rec)
            rec = self.records[req_id] = RequestRecord(wire)
        return rec

    def layer_plans(self, req_id: str, wire: object, compile: Compile) -> dict[int, LayerPlan]:
        """The request's ops compiled for this worker's layers ({} when it has none or they cannot run)."""
        rec = self.record(req_id, wire)
        if rec.layer_plans is None:
            self._free(rec)
            plan = self.plan_of(wire, req_id)
            try:
                rec.layer_plans = compile(req_id, plan, rec.inline_rows) if plan is not None else {}
            except Exception as err:  # no room, or a source unloaded since it was resolved: unsteered
                self._free(rec)
                self._reject("capacity" if isinstance(err, ScratchFull) else "steering", req_id, err)
                rec.layer_plans = {}
        return rec.layer_plans

    def observation(self, req_id: str, wire: object, narrow: Narrow) -> ObservePlan | None:
        """What to read for the request, narrowed by `narrow` (other pipeline stages read the rest)."""
        rec = self.record(req_id, wire)
        if not rec.observe_known:
            plan = self.plan_of(wire, req_id)
            rec.observe = narrow(plan.observe) if plan is not None and plan.observe is not None else None
            rec.observe_known = True
        return rec.observe

    def compiled(self, req_id: str) -> dict[int, LayerPlan]:
        """The request's compiled layer plans, {} when none are cached."""
        rec = self.records.get(req_id)
        return (rec.layer_plans or {}) if rec is not None else {}

    def released(self, req_id: str) -> None:
        """The request gave its slot back: its inline rows are free again, so its plan (which names them) is
        compiled afresh if it comes back."""
        rec = self.records.get(req_id)
        if rec is not None and rec.inline_rows:
            self._free(rec)
            rec.layer_plans = None

    def drop_compiled(self) -> None:
        """Bank rows moved: every request compiles afresh when it next enters a slot."""
        for rec in self.records.values():
            rec.layer_plans = None

    def prune(self, live: list[str], wires: list, in_slots) -> None:
        """Forget requests that left (keeping those still in a slot) once the table is well past the batch."""
        bound = 4 * max(len(live), 64)
        if len(self._decoded) <= bound and len(self.records) <= bound:
            return
        keep = set(live) | set(in_slots)
        for req_id in [r for r in self.records if r not in keep]:
            self._free(self.records.pop(req_id))  # a plan made for a request that never took its slot
        live_wires = {_key(w) for w in wires if w is not None}
        self._decoded = {k: v for k, v in self._decoded.items() if k in live_wires}
        self._refused_askers = {k: v for k, v in self._refused_askers.items() if k in live_wires}

    def _free(self, rec: RequestRecord) -> None:
        if rec.inline_rows:
            self._free_rows(rec.inline_rows)
            rec.inline_rows = []


def _key(wire: object) -> object:
    return wire if isinstance(wire, str) else repr(wire)
