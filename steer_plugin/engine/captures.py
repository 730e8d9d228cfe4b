"""Which token rows each layer copies out this step, and for whom: SAE reads (observe.py), probes (probing.py)
and raw residual rows (residuals.py) of the step's observed requests, planned fresh every step."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from steer_plugin.engine.observe import ObservedRows, observed_requests, observed_rows
from steer_plugin.engine.probing import ProbedRows, probed_rows
from steer_plugin.engine.residuals import ResidualRows, residual_rows


class StepReads(NamedTuple):
    observed: list[ObservedRows] = []  # (request, SAE) groups
    probed: list[ProbedRows] = []  # (request, layer) groups of probes
    residuals: list[ResidualRows] = []  # (request, layer) groups written back raw

    def rows_by_layer(self, sae_layer: Callable[[str], int]) -> dict[int, np.ndarray]:
        """Token rows to capture at each layer (sorted, unique); `sae_layer(sae_id)`: the SAE's layer."""
        rows: dict[int, set[int]] = {}
        for group in self.observed:
            rows.setdefault(sae_layer(group.sae_id), set()).update(group.rows)
        for group in (*self.probed, *self.residuals):
            rows.setdefault(group.layer, set()).update(group.rows)
        return {layer: np.array(sorted(found), dtype=np.int64) for layer, found in rows.items()}


def plan_reads(layout: tuple, observe_for, probe_layer: Callable[[str], int | None]) -> StepReads:
    """The step's reads; `layout`: (req_ids, wires, query_start, num_computed, num_prompt) of the batch,
    `observe_for(req_id, wire)`: the request's narrowed observation (None: not observed)."""
    if not any(layout[1]):
        return StepReads()
    requests = observed_requests(*layout, observe_for)  # each request's observation and rows, once
    return StepReads(
        observed_rows(requests),
        probed_rows(requests, probe_layer),
        residual_rows(requests),
    )
