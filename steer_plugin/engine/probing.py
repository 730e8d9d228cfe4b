"""Scoring probes on observed tokens in the worker.

Probes read the same captured rows the SAE reads use: inside the op the steered residual rows of observed
tokens are copied to the layer's persistent capture buffer (graph-safe, engine/op.py); after the forward,
outside any graph, one [rows, d] x [d, sum of classes] product per layer scores every probe of the residual
asked for there, and one encode and product per SAE the probes of that SAE's features.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from steer_plugin.engine.blocks import abort_rows, probe_blocks
from steer_plugin.engine.observe import ObservedRequest
from steer_plugin.monitor import transport
from steer_plugin.probes.format import Probe
from steer_plugin.request.wire import Addressee, ProbeAbortSpec
from steer_plugin.sae.model import SparseAutoencoder as SAE


class ProbedRows(NamedTuple):
    """Tokens of one request to score with the probes it asks for at one layer."""

    to: Addressee  # where its records go
    layer: int
    probes: tuple[str, ...]
    rows: list[int]
    positions: list[int]
    num_prompt: int
    abort: tuple[ProbeAbortSpec, ...] = ()  # abort_when on these probes, tested at position `predicting`
    predicting: int = -1  # position whose residual predicts the request's next sampled token (-1: none)
    req_index: int = -1  # the request's index in the step's batch


class InputProbes(NamedTuple):
    """A layer's probes of one input (the residual, or one SAE's features) stacked for one product."""

    sae: str | None  # whose features they read; None: the residual
    ids: tuple[str, ...]
    weight: torch.Tensor  # [sum of classes, width]
    bias: torch.Tensor  # [sum of classes]
    sigmoid: bool | torch.Tensor  # True: every column is a sigmoid probe's; False: none; else a bool mask


class LayerProbes(NamedTuple):
    """A layer's probes: one stack per input, their scores side by side in this order."""

    ids: tuple[str, ...]
    parts: tuple[InputProbes, ...]
    offsets: tuple[int, ...]  # probe i's classes are columns offsets[i]:offsets[i+1]
    columns: dict[str, tuple[int, int]]  # probe id -> its (first, end) column


def probed_rows(requests: list[ObservedRequest], layer_of) -> list[ProbedRows]:
    """This step's token rows to score, one group per (request, layer); `layer_of(probe_id)` is its layer
    (None for a probe this worker no longer has)."""
    groups = []
    by_list: dict[tuple, list[tuple[int, tuple[str, ...], tuple[ProbeAbortSpec, ...]]]] = {}
    for i, spec, found in requests:
        key = (spec.probes, spec.probe_abort)  # requests share probe lists: each one is split once a step
        layers = by_list.get(key)
        if layers is None:
            layers = by_list[key] = _by_layer(spec.probes, spec.probe_abort, layer_of)
        for layer, ids, abort in layers:
            groups.append(
                ProbedRows(
                    spec.to,
                    layer,
                    ids,
                    found.rows,
                    found.positions,
                    found.num_prompt,
                    abort,
                    found.predicting,
                    i,
                )
            )
    return groups


def _by_layer(probes: tuple[str, ...], aborts: tuple[ProbeAbortSpec, ...], layer_of):
    """(layer, its probes, the abort_when conditions on them) per layer, for one list of probes."""
    by_layer: dict[int, list[str]] = {}
    for probe_id in probes:
        layer = layer_of(probe_id)
        if layer is not None:  # None: unloaded since the request was planned (no longer scored)
            by_layer.setdefault(layer, []).append(probe_id)
    return [
        (layer, tuple(ids), tuple(a for a in aborts if a.probe in ids)) for layer, ids in by_layer.items()
    ]


class ProbeReader:
    """Scores probes on captured rows and sends their records to the requests' API processes."""

    def __init__(self, probes: dict[str, Probe], device: torch.device, write: bool, sink_positions: int = 1):
        self.probes = dict(probes)
        self.device = device
        self.write = write  # only one tensor-parallel rank writes
        self.sink_positions = sink_positions
        self.layers: dict[int, LayerProbes] = {}
        self.windows = Windows()  # windowed abort_when conditions' recent scores
        for layer in sorted({p.meta.layer for p in self.probes.values()}):
            self._stack(layer)

    def _stack(self, layer: int) -> None:
        """(Re)build the layer's stacked weights from the probes it has now (none: the layer is dropped)."""
        probes = self.probes
        mine = [pid for pid, p in probes.items() if p.meta.layer == layer]
        if not mine:
            self.layers.pop(layer, None)
            return
        parts = []
        for sae in dict.fromkeys(probes[pid].meta.sae for pid in mine):  # the residual, SAEs: one part each
            ids = tuple(pid for pid in mine if probes[pid].meta.sae == sae)
            sigmoid = [
                probes[pid].meta.activation == "sigmoid" for pid in ids for _ in probes[pid].meta.labels
            ]
            parts.append(
                InputProbes(
                    sae,
                    ids,
                    torch.cat([probes[pid].weight for pid in ids]).to(self.device),
                    torch.cat([probes[pid].bias for pid in ids]).to(self.device),
                    sigmoid_columns(sigmoid, self.device),
                )
            )
        ids = tuple(pid for part in parts for pid in part.ids)
        sizes = [len(probes[pid].meta.labels) for pid in ids]
        offsets = tuple(int(x) for x in torch.tensor([0, *sizes]).cumsum(0))
        self.layers[layer] = LayerProbes(
            ids, tuple(parts), offsets, {pid: (offsets[j], offsets[j + 1]) for j, pid in enumerate(ids)}
        )

    def add(self, probe_id: str, probe: Probe) -> None:
        """A probe loaded at runtime: scored from the next step on (its layer's weights stacked again)."""
        self.probes[probe_id] = probe
        self._stack(probe.meta.layer)

    def remove(self, probe_id: str) -> None:
        """A probe unloaded at runtime: requests that asked for it just stop getting its scores."""
        probe = self.probes.pop(probe_id, None)
        if probe is not None:
            self._stack(probe.meta.layer)

    def _fired(self, cid: str, conditions, probes, columns, pos: int, row: list[float]):
        """The first abort_when condition that holds on this row of scores (position `pos`, the one that predicts
        the request's next token): (position, probe, label index, score, or the window's mean), or None."""
        for cond in conditions:
            if cond.probe in probes:
                lo, hi = columns[cond.probe]
                if cond.column >= hi - lo:
                    continue
                score = row[lo + cond.column]
                if cond.window > 1:
                    score = self.windows.mean(cid, cond, pos, score)
                if score is not None and cond.fires(score):
                    return pos, cond.probe, cond.column, score
        return None

    def layer_of(self, probe_id: str) -> int | None:
        probe = self.probes.get(probe_id)
        return None if probe is None else probe.meta.layer

    def collect(
        self, groups: list[ProbedRows], captures: dict[int, torch.Tensor], saes: Mapping[str, SAE] = {}
    ) -> list[int]:
        """groups' rows index into captures[layer] ([max_tokens, d] steered residual by token row): one product
        per layer and input for all of its groups, every probe of the layer scored (a few columns: cheaper than
        picking); `saes`: the SAEs whose features probes read (a probe whose SAE is gone is not scored). The
        scores go out as one ProbeBlock per layer and API process. Returns the batch indices of the requests
        whose abort_when on a probe fired."""
        fired: set[int] = set()
        sink = self.sink_positions
        for layer in dict.fromkeys(g.layer for g in groups):
            mine = [g for g in groups if g.layer == layer]
            stacked = self.layers.get(layer)
            if stacked is None:  # its probes were unloaded since this step was planned
                continue
            x = captured_rows(captures[layer], [r for g in mine for r in g.rows])  # [n, d] float32
            scores, unread = self._score(stacked, x, saes)
            values = scores.float().cpu().numpy()  # [n, sum of classes]
            present = _scored_here(stacked, unread)
            aborted: dict[int, tuple[int, str, int, float]] = {}  # by index in `mine`
            for i, at in abort_rows(mine, sink):
                g = mine[i]
                row = values[at].tolist()
                found = self._fired(g.to.cid, g.abort, present(g.probes), stacked.columns, g.predicting, row)
                if found is not None:
                    aborted[i] = found
                    fired.add(g.req_index)
            if self.write:
                for address, block in probe_blocks(stacked.columns, mine, values, present, aborted, sink):
                    transport.post_block(address, block)
        return sorted(fired)

    @staticmethod
    def _score(
        stacked: LayerProbes, x: torch.Tensor, saes: Mapping[str, SAE]
    ) -> tuple[torch.Tensor, set[str]]:
        """x [n, d] -> ([n, sum of classes] act(input·Wᵀ + b) per part, the input the residual or the SAE's
        features; the probes whose SAE is gone: NaN columns, left out of the records)."""
        scores, unread = [], set()
        for part in stacked.parts:
            sae = saes.get(part.sae) if part.sae is not None else None
            if part.sae is not None and sae is None:
                unread.update(part.ids)
                scores.append(torch.full((x.shape[0], part.bias.shape[0]), float("nan"), device=x.device))
                continue
            features = x if sae is None else sae.encode(x.to(sae.dtype)).float()  # [n, width]
            logits = torch.addmm(part.bias, features, part.weight.t())  # [n, classes of the part]
            if part.sigmoid is True:  # in place: at a few rows each op costs about what the product does
                logits.sigmoid_()
            elif part.sigmoid is not False:
                logits = torch.where(part.sigmoid, logits.sigmoid(), logits)
            scores.append(logits)
        return (scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)), unread


def _scored_here(stacked: LayerProbes, unread: set[str]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    """Which of a request's probes a layer scored this step (not unloaded since planned, their SAE here);
    memoised, as requests share probe lists."""

    memo: dict[tuple[str, ...], tuple[str, ...]] = {}

    def present(probes: tuple[str, ...]) -> tuple[str, ...]:
        found = memo.get(probes)
        if found is None:
            found = memo[probes] = tuple(p for p in probes if p in stacked.columns and p not in unread)
        return found

    return present


def sigmoid_columns(flags: list[bool], device: torch.device) -> bool | torch.Tensor:
    """Which columns of a stacked part go through a sigmoid: all (True), none (False), or a [columns] mask."""
    if all(flags) or not any(flags):
        return all(flags)
    return torch.tensor(flags, device=device)


def captured_rows(capture: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """capture's `rows` ([n, d]): a view when they are rows 0..n-1 (every token of the step observed, in batch
    order: no gather, which costs more than the probes' product at large n), else a gather."""
    if rows == list(range(len(rows))):
        return capture[: len(rows)]
    return capture.index_select(0, torch.tensor(rows, device=capture.device))


class Windows:
    """The recent scores of windowed abort_when conditions (ProbeAbortSpec.window > 1), per request, condition
    and predicting position: a recomputed position (preemption) replaces its score. Bounded: the least recently
    scored requests are dropped first (a finished request is never scored again)."""

    def __init__(self, max_keys: int = 4096):
        self.max_keys = max_keys
        self.scores: OrderedDict[tuple[str, str, int], dict[int, float]] = OrderedDict()

    def mean(self, cid: str, cond: ProbeAbortSpec, pos: int, score: float) -> float | None:
        """The mean score over positions pos - window + 1 .. pos once all of them were scored, else None."""
        key = (cid, cond.probe, cond.column)
        recent = self.scores.pop(key, {})  # (re-inserted last: the most recently used)
        recent[pos] = score
        first = pos - cond.window + 1
        recent = {p: s for p, s in recent.items() if first <= p <= pos}
        self.scores[key] = recent
        while len(self.scores) > self.max_keys:
            self.scores.popitem(last=False)
        if len(recent) < cond.window:
            return None
        return sum(recent.values()) / cond.window
