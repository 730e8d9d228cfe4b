"""A request's ops compiled for one worker: per layer it owns, the bank rows they read, their coefficients,
position rules and conditions (the `LayerPlan` a slot's tables are written from)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from steer_plugin.engine.bank import LayerBank
from steer_plugin.engine.requests import InlineRows
from steer_plugin.engine.tables import OP_NAMES, LayerPlan
from steer_plugin.request.ops import ResolvedOp


def compile_ops(
    banks: dict[int, LayerBank], ops: Iterable[ResolvedOp], inline_rows: InlineRows
) -> dict[int, LayerPlan]:
    """The ops on layers in `banks` (other pipeline ranks own the others), as rows of those banks; the scratch
    rows inline vectors take are appended to `inline_rows` (their owner gives them back)."""
    by_layer: dict[int, list[ResolvedOp]] = {}
    for o in ops:
        if o.layer in banks:
            by_layer.setdefault(o.layer, []).append(o)
    plans = {}
    for layer, layer_ops in by_layer.items():
        bank = banks[layer]
        rows = []
        for o in layer_ops:
            if o.kind == "inline":  # held until the request's slot is released
                row = bank.take_scratch(torch.from_numpy(o.inline.values))
                inline_rows.append((layer, row))
            else:
                row = bank.row(o.kind, o.source, o.index, o.revision)
            rows.append(row)
        whens = [o.when for o in layer_ops]
        plans[layer] = LayerPlan(
            bank_rows=np.array(rows, dtype=np.int64),
            coef=np.array([[o.coef.a, o.coef.b, o.coef.bn] for o in layer_ops], dtype=np.float32),
            positions=np.array([o.positions.code for o in layer_ops], dtype=np.int8),
            last_n=np.array([o.positions.last_n for o in layer_ops], dtype=np.int64),
            op_codes=np.array([OP_NAMES.index(o.op) for o in layer_ops], dtype=np.int8),
            cond_rows=np.array(
                [-1 if w is None else bank.row("feature", w.sae, w.index, w.revision) for w in whens],
                np.int64,
            ),
            cond_thr=np.array([0.0 if w is None else w.threshold for w in whens], np.float32),
            cond_sign=np.array([0 if w is None else w.sign for w in whens], np.int8),
        )
    return plans
