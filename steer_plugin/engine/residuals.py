"""Writing raw residual rows of observed tokens back to the API process (the admin's fit endpoints).

The same captured rows the SAE reads and the probes use (engine/op.py copies the steered residual rows of
observed tokens to the layer's persistent capture buffer, graph-safe); after the forward, outside any graph,
each asked-for row goes to the request's API process as a ResidualRecord (float32, exact). Only plans the API
process builds for a fit ask for this (ObservePlan.residuals); the public `steering` field cannot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from steer_plugin.engine.observe import ObservedRequest
from steer_plugin.monitor import transport
from steer_plugin.request.records import ResidualRecord
from steer_plugin.request.wire import Addressee


class ResidualRows(NamedTuple):
    """Tokens of one request whose residual after `layer` goes back raw."""

    to: Addressee  # where its records go
    layer: int
    rows: list[int]
    positions: list[int]
    num_prompt: int


def residual_rows(requests: list[ObservedRequest]) -> list[ResidualRows]:
    """This step's rows to write back, one group per (request, layer) (the narrowed observation's `residuals`
    are layers this worker captures)."""
    groups = []
    for _, spec, found in requests:
        for layer in spec.residuals:
            groups.append(ResidualRows(spec.to, layer, found.rows, found.positions, found.num_prompt))
    return groups


def write_residuals(groups: list[ResidualRows], captures: dict[int, torch.Tensor], write: bool) -> None:
    """groups' rows index into captures[layer] ([max_tokens, d], by token row); `write`: this rank writes
    (only one tensor-parallel rank does)."""
    if not write:
        return
    records: dict[Addressee, list[ResidualRecord]] = {}
    for g in groups:
        rows = captures[g.layer][g.rows].float().cpu().numpy()  # [n, d]
        lines = records.setdefault(g.to, [])
        lines.extend(
            ResidualRecord.of(pos, g.num_prompt, g.layer, rows[k]) for k, pos in enumerate(g.positions)
        )
    transport.post_all(records)
