"""Slot plans, the working set and per-step token metadata: what is written when, and that nothing stale
survives a slot changing hands or a step that skipped preparation."""

import numpy as np
import pytest
import torch

from steer_plugin.engine.bank import LayerBank
from steer_plugin.engine.delta import position_gate
from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import NO_OP, OP_NAMES, LayerPlan, LayerTables, WorkingSetFull
from steer_plugin.request.ops import POSITION_CODES

D, N = 4, 12


def bank() -> LayerBank:
    g = torch.Generator().manual_seed(0)
    dec, enc = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    params = torch.arange(N, dtype=torch.float32)[:, None].expand(N, 10).clone()
    return LayerBank(3, dec, enc, params, [])


def plan(rows, coefs=None, positions=None, last_n=None):
    m = len(rows)
    return LayerPlan(
        bank_rows=np.array(rows, dtype=np.int64),
        coef=np.array(coefs or [[0, 1, 0]] * m, dtype=np.float32),
        positions=np.array([POSITION_CODES[p] for p in positions or ["all"] * m], dtype=np.int8),
        last_n=np.array(last_n or [0] * m, dtype=np.int64),
        op_codes=np.array([OP_NAMES.index("add")] * m, dtype=np.int8),
    )


def test_slots_share_working_set_columns_and_give_them_back():
    b = bank()
    t = LayerTables(b, max_slots=4, max_ops=3, capacity=6, device=torch.device("cpu"))
    t.set_slot(0, plan([7, 2]))
    t.set_slot(1, plan([2, 9], [[-1, 3, 0], [0, 1, 0]]))
    assert t.width == 3 and t.terms.read
    cols = t.slot_col_host.numpy()
    assert sorted(set(cols[:2, :2].flat)) == [0, 1, 2]  # three distinct rows, three columns
    assert cols[0, 1] == cols[1, 0]  # row 2 is one column for both slots
    for slot, k, row in ((0, 0, 7), (0, 1, 2), (1, 1, 9)):  # columns are copies of their bank rows
        col = cols[slot, k]
        assert torch.equal(t.dec[col], b.dec[row]) and torch.equal(t.params[col], b.params[row])
    # Only a column something reads holds its encoder row: row 2 is clamped by slot 1; 7 and 9 are only added.
    assert torch.equal(t.enc[cols[0, 1]], b.enc[2].float())
    assert not t.enc[cols[0, 0]].any() and not t.enc[cols[1, 1]].any()
    col_of_9 = cols[1, 1]
    assert t.slot_code_host.numpy()[0].tolist() == [0, 0, NO_OP]
    t.set_slot(1, None)  # row 9's column frees; row 2 is still used by slot 0
    assert not t.terms.read and sorted(t._col_of_row) == [2, 7]
    assert t.slot_code_host.numpy()[1].tolist() == [NO_OP] * 3
    assert not t.dec[col_of_9].any()  # a freed column adds nothing even through a stale coefficient
    t.set_slot(0, None)
    assert t.width == 0 and not t._col_of_row
    t.set_slot(2, plan([5]))
    assert t.slot_col_host.numpy()[2, 0] == 0  # the lowest free column is reused


def test_encoder_rows_are_copied_when_a_read_first_needs_them():
    b = bank()
    t = LayerTables(b, max_slots=4, max_ops=3, capacity=6, device=torch.device("cpu"))
    t.set_slot(0, plan([4]))  # add: no read
    col = t.slot_col_host.numpy()[0, 0]
    assert not t.enc[col].any()
    t.set_slot(1, plan([4], [[-1, 2, 0]]))  # a clamp of the same row reads it: the copy is made now
    assert t.slot_col_host.numpy()[1, 0] == col and torch.equal(t.enc[col], b.enc[4].float())
    cond = plan([5])._replace(
        cond_rows=np.array([6]), cond_thr=np.array([0.5], np.float32), cond_sign=np.array([1], np.int8)
    )
    t.set_slot(2, cond)  # a condition reads its feature's row
    cond_col = t.slot_cond_col_host.numpy()[2, 0]
    assert torch.equal(t.enc[cond_col], b.enc[6].float())
    assert not t.enc[t.slot_col_host.numpy()[2, 0]].any()  # the added row 5 is not read
    for slot in range(3):
        t.set_slot(slot, None)
    t.set_slot(0, plan([9], [[-1, 1, 0]]))  # a freed column reused by a read gets the new row, not the old
    assert torch.equal(t.enc[t.slot_col_host.numpy()[0, 0]], b.enc[9].float())


def test_a_full_working_set_refuses_the_plan_and_leaves_the_slot_empty():
    t = LayerTables(bank(), max_slots=4, max_ops=3, capacity=3, device=torch.device("cpu"))
    t.set_slot(0, plan([1, 2]))
    with pytest.raises(WorkingSetFull):
        t.set_slot(1, plan([3, 4]))
    assert t.slot_code_host.numpy()[1].tolist() == [NO_OP] * 3
    assert sorted(t._col_of_row) == [1, 2]  # row 3's column was given back
    t.set_slot(1, plan([2]))  # a row already in the set needs no new column
    assert t.width == 2


def test_position_rule():
    # entries: all, prompt, generation, last 2 prompt tokens, unused; prompt length 5
    code = torch.tensor([[0, 1, 2, 3, NO_OP]] * 7)
    last_n = torch.tensor([[0, 0, 0, 2, 0]] * 7)
    pos = torch.arange(7)
    gate = position_gate(code, last_n, pos, torch.full((7,), 5))
    expected = [[True, p < 5, p >= 5, 3 <= p < 5, False] for p in range(7)]
    assert gate.tolist() == expected


def test_step_metadata_rows_positions_and_disarm():
    step = StepMetadata(max_tokens=16, max_slots=4, device=torch.device("cpu"))
    a, b = step.acquire("a", 5), step.acquire("b", 4)
    null = step.null_slot
    # request a: prefill rows 0..4 at positions 0..4; unsteered request: row 5; b: one decode token at position 7
    step.write(np.array([a, null, b]), np.array([0, 5, 6, 7]), np.array([0, 3, 7]))
    assert step.token_slot_host[:8].tolist() == [a] * 5 + [null, b, null]
    assert step.token_pos_host[:7].tolist() == [0, 1, 2, 3, 4, 3, 7]
    assert step.steered_rows_host.tolist() == [0, 1, 2, 3, 4, 6]
    assert step.prompt_len_host[[a, b]].tolist() == [5, 4]
    step.write(np.array([b]), np.array([0, 1]), np.array([8]))  # a smaller batch: the old rows go NULL
    assert step.token_slot_host[:8].tolist() == [b] + [null] * 7
    step.disarm()
    assert (step.token_slot_host == null).all() and step.num_tokens == 0 and step.steered_rows_host.size == 0
    assert step.release("a") == a and step.acquire("c", 2) == a  # lowest free slot first
