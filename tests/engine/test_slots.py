"""The slot planner reports, its owner decides: `diff` says which requests leave and enter, `release_many` and
`admit`/`take` say what they did (what went back, what did not fit), and nothing flows back into the owner
through a callback. Checked on a real StepMetadata and real tables at two layers, row by row."""

import inspect

import numpy as np
import torch

from steer_plugin.engine.bank import LayerBank
from steer_plugin.engine.slots import BatchChanges, Newcomer, SlotPlanner
from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import NO_OP, OP_NAMES, LayerPlan, LayerTables, WorkingSetFull

D, N, MAX_SLOTS, MAX_OPS = 4, 16, 4, 3
LAYERS = (3, 5)


def plan(rows) -> LayerPlan:
    m = len(rows)
    return LayerPlan(
        bank_rows=np.array(rows, dtype=np.int64),
        coef=np.array([[0, 1, 0]] * m, dtype=np.float32),
        positions=np.zeros(m, dtype=np.int8),
        last_n=np.zeros(m, dtype=np.int64),
        op_codes=np.array([OP_NAMES.index("add")] * m, dtype=np.int8),
    )


def planner(capacity: int = MAX_SLOTS * MAX_OPS) -> SlotPlanner:
    g = torch.Generator().manual_seed(0)
    tables = {}
    for layer in LAYERS:
        dec, enc = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
        bank = LayerBank(layer, dec, enc, torch.zeros(N, 10), [])
        tables[layer] = LayerTables(bank, MAX_SLOTS, MAX_OPS, capacity, torch.device("cpu"))
    return SlotPlanner(StepMetadata(64, MAX_SLOTS, torch.device("cpu")), tables)


def rows_at(p: SlotPlanner, layer: int, slot: int) -> list[int]:
    """The bank rows the slot's plan names at the layer, in plan order ([] : no steering there)."""
    t = p.tables[layer]
    cols, codes = t.slot_col_host.numpy()[slot], t.slot_code_host.numpy()[slot]
    return [int(t._row_of_col[c]) for c, code in zip(cols, codes) if code != NO_OP]


def newcomers(p: SlotPlanner, changes: BatchChanges, req_ids, wires, plans) -> list[Newcomer]:
    """What the owner does between diff and admit: the plans of entering requests (here looked up by wire)."""
    return [Newcomer(req_ids[i], wires[i], 5, plans[wires[i]]) for i in changes.entering]


def step(p: SlotPlanner, req_ids, wires, positions) -> list[int]:
    """Write a one-token-per-request step; returns each token row's slot."""
    n = len(req_ids)
    p.write(req_ids, wires, np.arange(n + 1), np.array(positions))
    return p.step.token_slot_host[:n].tolist()


def test_entering_and_leaving_are_reported_and_the_owner_drives_every_change():
    assert list(inspect.signature(SlotPlanner).parameters) == ["step", "tables"]  # no callbacks to the owner
    p = planner()
    null = p.step.null_slot
    plans = {"wa": {3: plan([1, 2])}, "wc": {3: plan([2]), 5: plan([7])}, "wc2": {5: plan([8, 9])}}
    plans["wd"] = {3: plan([4])}
    ids, wires = ["a", "b", "c"], ["wa", None, "wc"]
    changes = p.diff(ids, wires)
    assert changes == BatchChanges(False, [], [0, 2])  # b has no wire: it never enters
    assert p.admit(newcomers(p, changes, ids, wires, plans)) == []
    assert step(p, ids, wires, [6, 2, 9]) == [0, null, 1]
    assert rows_at(p, 3, 0) == [1, 2] and rows_at(p, 5, 0) == []
    assert rows_at(p, 3, 1) == [2] and rows_at(p, 5, 1) == [7]

    assert p.diff(ids, wires) == BatchChanges(True, [], [])  # steady decode: nothing to do but positions
    assert step(p, ids, wires, [7, 3, 10]) == [0, null, 1]
    assert p.step.token_pos_host[:3].tolist() == [7, 3, 10]

    # "a" leaves, "c" changes its steering (it leaves and enters again), "d" enters.
    ids, wires = ["c", "b", "d"], ["wc2", None, "wd"]
    changes = p.diff(ids, wires)
    assert sorted(changes.leaving) == ["a", "c"] and changes.entering == [0, 2] and not changes.steady
    assert sorted(p.release_many(changes.leaving)) == ["a", "c"]
    assert not p.step.slot_of and all(rows_at(p, layer, s) == [] for layer in LAYERS for s in (0, 1))
    assert p.tables[3].width == 0 and p.tables[5].width == 0  # their working-set columns are free
    assert p.release_many(["a"]) == []  # in no slot: nothing went back
    assert p.admit(newcomers(p, changes, ids, wires, plans)) == []
    assert step(p, ids, wires, [11, 4, 0]) == [0, null, 1]  # the freed slots, lowest first
    assert rows_at(p, 3, 0) == [] and rows_at(p, 5, 0) == [8, 9]
    assert rows_at(p, 3, 1) == [4] and rows_at(p, 5, 1) == []

    assert sorted(p.clear()) == ["c", "d"]
    assert not p.step.slot_of and p.tables[3].width == 0 and p.tables[5].width == 0


def test_newcomers_that_do_not_fit_are_backed_out_and_one_refused_stays_unsteered_while_it_runs():
    p = planner(capacity=3)  # three working-set columns per layer
    null = p.step.null_slot
    plans = {"wa": {3: plan([1, 2])}, "wb": {3: plan([3, 4])}}
    ids, wires = ["a", "b"], ["wa", "wb"]
    changes = p.diff(ids, wires)
    assert changes.entering == [0, 1]
    backed_out = p.admit(newcomers(p, changes, ids, wires, plans))  # four rows, three columns: all or none
    assert [n.req_id for n in backed_out] == ["a", "b"]
    assert not p.step.slot_of and p.tables[3].width == 0
    # The owner admits them one at a time (with plans compiled afresh: here the same).
    taken = [p.take(n.req_id, n.wire, n.prompt_len, plans[n.wire]) for n in backed_out]
    assert taken[0] == (0, None)
    assert taken[1].slot == null and isinstance(taken[1].refused, WorkingSetFull)
    assert list(p.step.slot_of) == ["a"] and rows_at(p, 3, 0) == [1, 2] and rows_at(p, 3, 1) == []
    assert step(p, ids, wires, [5, 5]) == [0, null]

    # "a" leaves: there is room now, but "b" is not steered halfway through its output.
    changes = p.diff(["b"], ["wb"])
    assert changes == BatchChanges(False, ["a"], [])
    assert p.release_many(changes.leaving) == ["a"]
    assert step(p, ["b"], ["wb"], [6]) == [null]
    assert p.diff(["b"], ["wb"]).steady
    # Once "b" has left the batch, the refusal is forgotten: a request of that id may enter again.
    assert p.diff([], []).entering == []
    step(p, [], [], [])
    assert p.diff(["b"], ["wb"]).entering == [0]
