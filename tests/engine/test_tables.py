"""Host-side table filling: which token rows get which ops, and that nothing stale survives a step."""

import numpy as np
import torch

from steer_plugin.engine.tables import OP_NAMES, LayerPlan, LayerTables, RequestSlice
from steer_plugin.spec import POSITION_CODES


def plan(rows, coefs, positions, last_n=None):
    m = len(rows)
    return LayerPlan(
        bank_rows=np.array(rows, dtype=np.int64),
        coef=np.array(coefs, dtype=np.float32),
        positions=np.array([POSITION_CODES[p] for p in positions], dtype=np.int8),
        last_n=np.array(last_n or [0] * m, dtype=np.int64),
        op_codes=np.array([OP_NAMES.index("add")] * m, dtype=np.int8),
    )


def test_positions_and_slots():
    t = LayerTables(max_tokens=16, max_ops=3, device=torch.device("cpu"))
    # request A: prefill of 5 prompt tokens at rows 0..4 (prompt length 5); ops: all, prompt-only, last 2 prompt
    a = plan(
        [10, 11, 12], [[0, 1, 0], [0, 2, 0], [0, 3, 0]], ["all", "prompt", "last_prompt_tokens"], [0, 0, 2]
    )
    # request B: one decode token at row 5, position 7 (prompt length 4); ops: generation, prompt-only
    b = plan([20, 21], [[0, 4, 0], [0, 5, 0]], ["generation", "prompt"])
    n = t.fill([RequestSlice(0, 5, 0, 5, a), RequestSlice(5, 1, 7, 4, b)])
    assert n == 6
    idx = t.idx_host.numpy()
    assert idx[:3].tolist() == [[10, 11, 0], [10, 11, 0], [10, 11, 0]]
    assert idx[3:5].tolist() == [[10, 11, 12], [10, 11, 12]]  # last two prompt tokens get all three
    assert idx[5].tolist() == [20, 0, 0]  # generated token: generation op only, in slot 0
    assert t.coef_host.numpy()[5, 0, 1] == 4 and t.coef_host.numpy()[5, 1].tolist() == [0, 0, 0]
    assert t.mask_host.numpy()[:7].tolist() == [True] * 6 + [False]
    assert t.rows_host.numpy()[:6].tolist() == [0, 1, 2, 3, 4, 5]


def test_next_step_clears_previous_rows():
    t = LayerTables(max_tokens=8, max_ops=2, device=torch.device("cpu"))
    t.fill([RequestSlice(0, 4, 0, 4, plan([3], [[0, 1, 0]], ["all"]))])
    t.fill([RequestSlice(2, 1, 4, 4, plan([5], [[-1, 2, 0]], ["generation"]))])
    assert t.mask_host.numpy().tolist() == [False, False, True] + [False] * 5
    assert t.idx_host.numpy()[[0, 1, 3]].sum() == 0 and t.coef_host.numpy()[[0, 1, 3]].sum() == 0
    assert t.fill([]) == 0 and not t.mask_host.numpy().any() and not t.idx_host.numpy().any()


def test_generation_op_skips_a_prompt_chunk():
    t = LayerTables(max_tokens=8, max_ops=2, device=torch.device("cpu"))
    assert t.fill([RequestSlice(0, 4, 0, 10, plan([3], [[0, 1, 0]], ["generation"]))]) == 0
