"""A step's observation results packed for the API processes: one block per API process for each layer's probe
scores (`ProbeBlock`) and each SAE's reads (`TokenBlock`), every request's rows side by side as arrays, so the
worker's host work per observed request is a few list items, not a record per token (request/records.py reads
them back per request in the API process).

`groups` are a step's ProbedRows or ObservedRows of one layer or SAE, in the order their rows were read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np

from steer_plugin.request.records import ProbeBlock, TokenBlock

if TYPE_CHECKING:
    from steer_plugin.engine.observe import ObservedRows
    from steer_plugin.engine.probing import ProbedRows

    Rows = (
        ObservedRows | ProbedRows
    )  # one request's rows at a layer or SAE: both have to, positions, num_prompt


def by_api_process(groups: Sequence[Rows]) -> dict[str, list[int]]:
    """Group indices by the API process their records go to (an empty address: nowhere, left out)."""
    addresses = [g.to.address for g in groups]
    if addresses and addresses.count(addresses[0]) == len(addresses):  # (one API process: the usual case)
        return {addresses[0]: list(range(len(addresses)))} if addresses[0] else {}
    out: dict[str, list[int]] = {}
    for i, address in enumerate(addresses):
        out.setdefault(address, []).append(i)
    out.pop("", None)
    return out


def rows_of(arrays: list[np.ndarray], groups: Sequence[Rows], picked: list[int]) -> list[np.ndarray]:
    """The rows of the `picked` groups in each array ([rows, ...], every group's rows in order): the arrays
    themselves when that is all of them (no gather)."""
    if len(picked) == len(groups):
        return arrays
    starts = list(accumulate([len(g.positions) for g in groups], initial=0))
    index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in picked])
    return [a[index] for a in arrays]


def abort_rows(groups: Sequence[Rows], sink_positions: int) -> list[tuple[int, int]]:
    """(group index, its row among all the groups' rows in order) of each group with abort_when whose predicting
    position is among its rows this step and not an attention sink: where its conditions are tested."""
    out, row = [], 0
    for i, g in enumerate(groups):
        if g.abort and g.predicting in g.positions and g.predicting >= sink_positions:
            out.append((i, row + g.positions.index(g.predicting)))
        row += len(g.positions)
    return out


def _common(mine: list[Rows]) -> tuple[tuple, tuple, tuple, tuple]:
    """cids, ends, positions and prompt lengths of a block's requests."""
    return (
        tuple([bytes.fromhex(g.to.cid) for g in mine]),
        tuple(accumulate([len(g.positions) for g in mine])),
        tuple([p for g in mine for p in g.positions]),
        tuple([g.num_prompt for g in mine]),
    )


def probe_blocks(
    columns: dict[str, tuple[int, int]],
    groups: Sequence[ProbedRows],
    values: np.ndarray,
    present: Callable[[tuple[str, ...]], tuple[str, ...]],
    aborted: dict[int, tuple[int, str, int, float]],
    sink_positions: int,
) -> list[tuple[str, ProbeBlock]]:
    """A layer's probe scores as one ProbeBlock per API process: `values` [rows, columns] the groups' rows in
    order, `columns` each probe's (first, end) column, `present(probes)` which of a request's probes were
    scored, `aborted` the abort_when that fired (position, probe, label index, score) by group index."""
    out = []
    for address, picked in by_api_process(groups).items():
        mine = [groups[i] for i in picked]
        (rows,) = rows_of([values], groups, picked)
        layouts: dict[tuple[str, ...], int] = {}
        layout = [layouts.setdefault(present(g.probes), len(layouts)) for g in mine]
        block = ProbeBlock(
            *_common(mine),
            tuple(layout),
            tuple([tuple([(p, *columns[p]) for p in probes]) for probes in layouts]),
            int(values.shape[1]),
            rows.astype("<f4", copy=False).tobytes(),  # (C order)
            sink_positions,
            tuple([(j, *aborted[i]) for j, i in enumerate(picked) if i in aborted]) if aborted else (),
        )
        out.append((address, block))
    return out


def token_blocks(
    sae_id: str,
    groups: Sequence[ObservedRows],
    read: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    column: dict[int, int],
    aborted: dict[int, tuple[int, int, float]],
    sink_positions: int,
) -> list[tuple[str, TokenBlock]]:
    """An SAE's reads as one TokenBlock per API process: `read` the groups' rows in order (top-K values
    [rows, K], their indices, L0 [rows], reconstruction error [rows], watched features' activations [rows, W]),
    `column` a watched feature's column, `aborted` the abort_when that fired (position, feature index,
    activation) by group index."""
    values, indices, l0, error, watched = read
    k, out = int(values.shape[1]), []
    for address, picked in by_api_process(groups).items():
        mine = [groups[i] for i in picked]
        values_, indices_, l0_, error_, watched_ = rows_of(
            [values, indices, l0, error, watched], groups, picked
        )
        watches: dict[tuple[tuple[int, float], ...], int] = {}  # requests share watch lists
        watch = [watches.setdefault(g.watch, len(watches)) for g in mine]
        block = TokenBlock(
            sae_id,
            *_common(mine),
            tuple([min(g.top_k, k) for g in mine]),
            tuple([g.stats for g in mine]),
            tuple(watch),
            tuple([tuple([(i, column[i], t) for i, t in w]) for w in watches]),
            k,
            indices_.astype("<i4").tobytes(),
            values_.astype("<f4", copy=False).tobytes(),
            l0_.astype("<i4").tobytes(),
            error_.astype("<f4", copy=False).tobytes(),
            int(watched.shape[1]),
            watched_.astype("<f4", copy=False).tobytes(),
            sink_positions,
            tuple([(j, *aborted[i]) for j, i in enumerate(picked) if i in aborted]) if aborted else (),
        )
        out.append((address, block))
    return out
