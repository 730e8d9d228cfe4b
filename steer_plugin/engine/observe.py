"""Reading active features of observed tokens (inspect requests and monitored traffic) in the worker.

Inside the op only a copy is made: the steered residual rows of observed tokens go to a persistent capture
buffer (fixed addresses, graph-safe). The SAE encode and top-K run after the forward, outside any graph.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from steer_plugin.engine.blocks import abort_rows, token_blocks
from steer_plugin.messages import HistogramCounts
from steer_plugin.monitor import transport
from steer_plugin.request.wire import AbortSpec, Addressee, ObservePlan
from steer_plugin.sae.model import SparseAutoencoder

L0_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)


class ObservedRows(NamedTuple):
    """Tokens of one request to read with one SAE: their token rows in this step and their positions."""

    to: Addressee  # where its records go
    sae_id: str
    top_k: int
    rows: list[int]
    positions: list[int]
    num_prompt: int
    watch: tuple[tuple[int, float], ...] = ()  # (feature index, threshold): tested on every token
    stats: bool = False  # monitored: L0 and reconstruction error go to the records and the histograms
    abort: tuple[AbortSpec, ...] = ()  # abort_when conditions on this SAE, tested at position `predicting`
    predicting: int = -1  # position whose residual predicts the request's next sampled token (-1: none)
    req_index: int = -1  # the request's index in the step's batch


class RequestRows(NamedTuple):
    """One observed request's token rows in this step."""

    rows: list[int]  # token rows of the batch
    positions: list[int]  # their positions in the request's sequence
    num_prompt: int
    predicting: int  # position whose residual predicts this step's sampled token (-1: none)


def request_rows(spec: ObservePlan, i: int, query_start, num_computed, num_prompt) -> RequestRows | None:
    """Request i's observed token rows: every prompt row when it observes its prompt, else the row whose
    logits give the token this step samples (None while a chunked prefill has not reached the prompt's end)."""
    start, end = int(query_start[i]), int(query_start[i + 1])
    first, prompt_len = int(num_computed[i]), int(num_prompt[i])
    samples = first + (end - start) >= prompt_len and end > start  # this step samples a token
    if spec.prompt:
        rows = list(range(start, end))
    elif samples:
        rows = [end - 1]  # the row whose logits give this step's sampled token
    else:
        rows = []
    if not rows:
        return None
    positions = [first + r - start for r in rows]
    return RequestRows(rows, positions, prompt_len, first + end - 1 - start if samples else -1)


class ObservedRequest(NamedTuple):
    """One observed request of the step: its batch index, its (narrowed) observation and its rows."""

    index: int
    spec: ObservePlan
    found: RequestRows


def observed_requests(
    req_ids, wires, query_start, num_computed, num_prompt, observe_for
) -> list[ObservedRequest]:
    """The step's observed requests with rows this step (see request_rows), each worked out once for the SAE
    reads, the probes and the residual reads. `observe_for(req_id, wire)`: the request's observation (None: not
    observed)."""
    out = []
    # Python ints, converted once a step: indexing the arrays per request costs more than the rest of it
    query_start, num_computed, num_prompt = (
        np.asarray(a).tolist() for a in (query_start, num_computed, num_prompt)
    )
    for i, wire in enumerate(wires):
        if not wire:
            continue
        spec = observe_for(req_ids[i], wire)
        if spec is None:
            continue
        found = request_rows(spec, i, query_start, num_computed, num_prompt)
        if found is not None:
            out.append(ObservedRequest(i, spec, found))
    return out


def observed_rows(requests: list[ObservedRequest]) -> list[ObservedRows]:
    """This step's SAE reads, one group per (request, SAE)."""
    groups = []
    for i, spec, found in requests:
        for sae_id in spec.saes:
            groups.append(
                ObservedRows(
                    spec.to,
                    sae_id,
                    spec.top_k,
                    found.rows,
                    found.positions,
                    found.num_prompt,
                    tuple((w.index, w.threshold) for w in spec.watch if w.sae == sae_id),
                    stats=sae_id in spec.stats,
                    abort=tuple(a for a in spec.abort if a.sae == sae_id),
                    predicting=found.predicting,
                    req_index=i,
                )
            )
    return groups


class AbortHit(NamedTuple):
    """An abort_when condition that fired: the request's sampled token is forced to end the sequence."""

    req_index: int
    cid: str
    position: int
    sae_id: str
    index: int
    activation: float


class ObserverStats(NamedTuple):
    """The observer's cumulative figures (WorkerStats carries them to the API process)."""

    l0: dict[str, HistogramCounts]  # SAE -> its L0 per observed token
    reconstruction_error: dict[str, HistogramCounts]  # SAE -> its relative reconstruction error per token
    tokens_observed: int


class Histogram:
    """Cumulative histogram state (Prometheus style) kept in the worker and pulled by the API server."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last = +Inf
        self.total = 0.0

    def observe_many(self, values: np.ndarray) -> None:
        self.counts += np.bincount(
            np.searchsorted(self.buckets, values, side="left"), minlength=len(self.buckets) + 1
        )
        self.total += float(values.sum())

    def snapshot(self) -> HistogramCounts:
        return HistogramCounts(list(self.buckets), self.counts.tolist(), self.total)


class FeatureRead(NamedTuple):
    """What one encode of n observed rows gives."""

    values: torch.Tensor  # [n, k] top-k activations
    indices: torch.Tensor  # [n, k]
    l0: torch.Tensor  # [n] (not counted on the inspect-only TopK read: zeros)
    error: torch.Tensor  # [n] relative reconstruction error (with stats; else NaN)
    watched: torch.Tensor  # [n, w] activations of the watched features


def read_features(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    top_k: int,
    watched: list[int] | None = None,
    stats: bool = True,
) -> FeatureRead:
    """x [n, d] -> top-k features, the watched features' activations and, with stats, L0 and the relative
    reconstruction error (the decode is skipped without stats: its error is NaN then)."""
    x = x.to(sae.dtype)
    x_n, state = sae.normalise(x)
    projected = sae.project(x_n)  # [n, d_sae]
    if sae.architecture == "topk" and not stats and not watched:
        # The common inspect read (top-K only) of a TopK SAE: its K strongest features are the strongest
        # pre-activations (those above 0), so one small top-K of `pre` replaces the SAE's top-k, the dense
        # features and a second top-K over them.
        pre = projected.add_(sae.b_enc)  # (in place: the product is this call's own)
        values, indices = torch.topk(pre, max(1, min(top_k, sae.k)), dim=-1)  # [n, top_k], strongest first
        n = x.shape[0]  # (L0 and the error feed monitoring only, which asks for stats: not read here)
        zero, nan, empty = (
            torch.zeros(n, dtype=torch.long),
            torch.full((n,), float("nan")),
            torch.zeros((n, 0)),
        )
        return FeatureRead(torch.relu(values).float(), indices, zero, nan, empty)
    f = sae.features(projected)  # [n, d_sae]
    if stats:
        x_hat = sae.decode(f, state)
        err = (x - x_hat).float().pow(2).sum(-1) / x.float().pow(2).sum(-1).clamp_min(1e-12)  # [n]
    else:
        err = torch.full((x.shape[0],), float("nan"))
    values, indices = torch.topk(f.float(), max(1, min(top_k, f.shape[-1])), dim=-1)
    watch = f[:, torch.tensor(watched or [], dtype=torch.long, device=f.device)].float()  # [n, w]
    return FeatureRead(values, indices, (f > 0).sum(-1), err, watch)


class Observer:
    """Turns captured rows into SAE reads sent to the requests' API processes (one block per SAE and process a
    step), and keeps L0 / error histograms."""

    def __init__(self, saes: dict[str, SparseAutoencoder], write: bool, sink_positions: int = 1):
        self.saes = saes
        self.write = write  # only one tensor-parallel rank writes
        self.sink_positions = sink_positions  # positions 0..N-1: attention sinks (config.monitoring)
        self.l0 = {sid: Histogram(L0_BUCKETS) for sid in saes}
        self.error = {sid: Histogram(ERROR_BUCKETS) for sid in saes}
        self.tokens_observed = 0

    def add(self, sae_id: str, sae: SparseAutoencoder) -> None:
        """An SAE loaded at runtime becomes readable (its histograms start empty)."""
        self.saes[sae_id] = sae
        self.l0[sae_id] = Histogram(L0_BUCKETS)
        self.error[sae_id] = Histogram(ERROR_BUCKETS)

    def remove(self, sae_id: str) -> None:
        for table in (self.saes, self.l0, self.error):
            table.pop(sae_id, None)

    def collect(self, groups: list[ObservedRows], captures: dict[str, torch.Tensor]) -> list[AbortHit]:
        """groups' rows index into captures[sae_id] ([max_tokens, d] steered residual, by token row). One encode
        per SAE; its reads go out as one TokenBlock per API process. Returns the abort_when conditions that
        fired (the first per request)."""
        hits: dict[int, AbortHit] = {}
        for sae_id in dict.fromkeys(g.sae_id for g in groups):
            mine = [g for g in groups if g.sae_id == sae_id]
            rows = [r for g in mine for r in g.rows]
            top_k = max(g.top_k for g in mine)
            watched = sorted({i for g in mine for i, _ in g.watch} | {a.index for g in mine for a in g.abort})
            column = {index: c for c, index in enumerate(watched)}
            stats = any(g.stats for g in mine)
            x = captures[sae_id][rows]
            read = [t.cpu().numpy() for t in read_features(self.saes[sae_id], x, top_k, watched, stats)]
            values, indices, l0, error, watch_values = read  # (FeatureRead's fields, on the host)
            if stats:  # histograms from the monitored requests' tokens only, attention sinks left out
                monitored = np.concatenate(
                    [
                        np.asarray(g.positions) >= self.sink_positions
                        if g.stats
                        else np.zeros(len(g.rows), bool)
                        for g in mine
                    ]
                )
                self.l0[sae_id].observe_many(l0[monitored])
                self.error[sae_id].observe_many(error[monitored])
            self.tokens_observed += len(rows)
            aborted = self._aborts(sae_id, mine, watch_values, column, hits) if watched else {}
            if self.write:
                for address, block in token_blocks(sae_id, mine, read, column, aborted, self.sink_positions):
                    transport.post_block(address, block)
        return list(hits.values())

    def _aborts(
        self, sae_id: str, groups: list[ObservedRows], watched: np.ndarray, column: dict[int, int], hits: dict
    ) -> dict[int, tuple[int, int, float]]:
        """The abort_when conditions that fire at the groups' predicting positions (attention sinks never do; a
        request's first hit, over its SAEs, wins): (position, feature index, activation) by group index; each
        also goes to `hits` by batch index."""
        out = {}
        for i, at in abort_rows(groups, self.sink_positions):
            g = groups[i]
            if g.req_index in hits:
                continue
            for a in g.abort:
                value = float(watched[at, column[a.index]])
                if a.fires(value):
                    out[i] = (g.predicting, a.index, value)
                    hits[g.req_index] = AbortHit(g.req_index, g.to.cid, g.predicting, sae_id, a.index, value)
                    break
        return out

    def snapshot(self) -> ObserverStats:
        return ObserverStats(
            {k: h.snapshot() for k, h in self.l0.items()},
            {k: h.snapshot() for k, h in self.error.items()},
            self.tokens_observed,
        )
