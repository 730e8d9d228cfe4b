"""Observation read-back on the API side: the records the workers write for one observed request, per token.

The workers send their SAE reads and probe scores as blocks (request/records.py) to this process's inbox
(monitor/inbox.py), which cuts them into each request's `TokenRecord`s and `ProbeRecord`s; `Observation` reads
them as the response streams, formats the features of each token, reports an `abort_when` stop, and at the end
writes the monitoring line and counts (monitor/log.py, metrics.py). A read whose record never arrived (dropped on
the way, counted) is reported as null, never as an empty read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from steer_plugin import metrics
from steer_plugin.config import MonitoringConfig
from steer_plugin.monitor import inbox as observe_inbox
from steer_plugin.monitor import log as monitor_log
from steer_plugin.monitor import probes as probe_monitor
from steer_plugin.probes.aggregate import aggregate
from steer_plugin.request.records import ProbeRecord, ResidualRecord, TokenRecord

if TYPE_CHECKING:
    from steer_plugin.probes.format import ProbeMeta
    from steer_plugin.service import RewrittenRequest

LabelsOf = Callable[[str], Mapping[int, str]]  # an SAE's feature labels, from the catalog in force
# How long one response may wait, in all, for records still on their way (the workers send a token's records
# before it is sampled, so they are normally here first; past this, missing reads are reported as null).
WAIT_BUDGET_S = 0.05
POLL_S = 0.001  # how often a waiting response looks again (asyncio.sleep: the other streams run meanwhile)


class TokenRead(NamedTuple):
    """What was read for one token: top-K features per SAE, the traced features' activations and the probes'
    scores by label; None wherever the record did not arrive."""

    features: dict[str, list[dict] | None]
    traced: list[float | None]
    probes: dict[str, dict[str, float] | None] = {}


class Observation:
    """One observed request on the API side: reads its workers' records and formats them per token."""

    def __init__(
        self,
        request: RewrittenRequest,
        labels_of: LabelsOf,
        monitoring: MonitoringConfig,
        probes: Mapping[str, ProbeMeta] = {},
    ):
        self.request = request
        self.labels_of = labels_of
        self.monitoring = monitoring
        planned = request.planned
        scored = dict.fromkeys(
            [*request.probes, *(a.probe for a in planned.probe_abort), *planned.monitored_probes]
        )
        self.probes = {pid: probes[pid] for pid in scored if pid in probes}  # what the workers score for it
        self.inbox = observe_inbox.inbox()
        self.cid = request.observe.cid
        self.inbox.open(self.cid)  # before the request reaches the engine
        self.wait_left = WAIT_BUDGET_S
        # Reads every token should have: one record per SAE, scores per probe.
        self.expected_saes = set(request.inspected) | {sae for sae, _ in request.traced}
        self.expected_probes = {pid for pid in request.probes if pid in self.probes}
        # The probes each token reports, in the request's order, with their labels.
        self.reported_probes = [
            (pid, self.probes[pid].labels) for pid in request.probes if pid in self.probes
        ]
        # Everything the workers read at each token: its SAEs (inspected, traced, monitored, abort_when) and probes.
        self.read_saes = set(request.observe.saes)
        self.by_pos: dict[int, dict[str, TokenRecord]] = {}  # pos -> sae -> its record
        self.records: list[TokenRecord] = []
        self.prompt_len: int | None = None
        self.next_token = 0
        self.values_read = 0  # values reported (counted once, at the end: a counter update per token costs)
        self.aborted: TokenRecord | None = None  # the record of the first abort_when condition that fired
        self.sinks: set[int] = set()  # positions the workers flagged as attention sinks
        self.scores: dict[int, dict[str, tuple[float, ...]]] = {}  # pos -> probe -> its scores
        # (position, probe, label index, score) of the first abort_when condition on a probe that fired
        self.probe_aborted: tuple[int, str, int, float] | None = None

    def _pull(self) -> None:
        for r in self.inbox.take(self.cid):
            if isinstance(r, ResidualRecord):  # only the fit endpoints ask for these (they read them there)
                continue
            self.prompt_len = r.num_prompt
            if isinstance(r, ProbeRecord):
                self.sinks.update(r.sinks)
                for pos, scores in r.tokens():
                    self.scores.setdefault(pos, {}).update(scores)
                if r.abort is not None and (self.probe_aborted is None or r.abort[0] < self.probe_aborted[0]):
                    self.probe_aborted = r.abort
                continue
            if r.sink:
                self.sinks.add(r.pos)
            self.records.append(r)
            if r.abort is not None and (self.aborted is None or r.pos < self.aborted.pos):
                self.aborted = r
            self.by_pos.setdefault(r.pos, {})[r.sae] = r

    def _complete(self, positions: range) -> bool:
        """Whether every read of `positions` has arrived."""
        return all(
            self.expected_saes <= self.by_pos.get(pos, {}).keys()
            and self.expected_probes <= self.scores.get(pos, {}).keys()
            for pos in positions
        )

    async def settle(self, generated: int, last: bool = False, prompt: bool = False) -> None:
        """Wait, within the response's budget and without blocking the event loop (every stream of this process
        runs on it), until what the next reads need has arrived: the reads of the answer's first `generated`
        tokens that `inspect` reports; with `last`, every read of its last token or an abort_when that fired (the
        worker's records travel apart from the tokens, so an answer's end can come before them); with `prompt`,
        the prompt's reads. Normally everything is here first and this does not wait. The reads themselves
        never wait: `next_tokens` reports what the last `settle` found (the response's path calls it right
        after, with no await between: one pull per event), the others (`abort`, `finish`, ...) pull what else
        has arrived."""
        reports_tokens = bool(self.expected_saes or self.expected_probes) and generated > self.next_token
        if not (reports_tokens or prompt or (last and generated)):
            return  # nothing to wait for (the reads pull what arrived)
        self._pull()
        while self.wait_left > 0 and not self._arrived(generated, last, prompt):
            start = time.monotonic()
            await asyncio.sleep(min(self.wait_left, POLL_S))
            self.wait_left -= max(time.monotonic() - start, 0.0005)
            self._pull()

    def _arrived(self, generated: int, last: bool, prompt: bool) -> bool:
        if self.prompt_len is None:
            return False
        first = self.prompt_len - 1  # the residual that predicts generated token k is at position first + k
        if not self._complete(range(first + self.next_token, first + generated)):
            return False
        if prompt and not self._complete(range(self.prompt_len)):
            return False
        if not last or not generated or self.aborted is not None or self.probe_aborted is not None:
            return True
        pos = first + generated - 1
        return (
            self.read_saes <= self.by_pos.get(pos, {}).keys()
            and self.probes.keys() <= self.scores.get(pos, {}).keys()
        )

    def probe_scores(self) -> dict[int, dict[str, tuple[float, ...]]]:
        """Every probe score read so far: position -> probe -> its scores (the judge cascade reads them)."""
        self._pull()
        return self.scores

    def _tokens(self, positions: range) -> list[TokenRead]:
        """The reads of `positions`, their values counted (steer_observation_values_total gets the sum when the
        response ends). Runs for every streamed token: what does not change per token is looked up once."""
        request = self.request
        top_k = request.inspect.top_k if request.inspect is not None else 0
        inspected = [(sae_id, self.labels_of(sae_id)) for sae_id in request.inspected]
        traced_features = request.traced
        out, counted = [], 0
        for pos in positions:
            found = self.by_pos.get(pos, {})
            features = {}
            for sae_id, labels in inspected:
                record = found.get(sae_id)
                if record is None:
                    features[sae_id] = None
                    continue
                top = record.top[:top_k]
                features[sae_id] = [{"index": i, "activation": a, "label": labels.get(i)} for i, a in top]
                counted += len(top)
            traced = []
            if traced_features:
                watched = {sae_id: dict(r.watch) for sae_id, r in found.items()}
                traced = [watched.get(sae_id, {}).get(index) for sae_id, index in traced_features]
            probes = {}
            if self.expected_probes:
                scored = self.scores.get(pos, {})
                # (per streamed token: no more than one dict per probe)
                for pid, labels in self.reported_probes:
                    scores = scored.get(pid)
                    if scores is None:
                        probes[pid] = None
                    elif len(labels) == 1:
                        probes[pid] = {labels[0]: scores[0]}
                    else:
                        probes[pid] = dict(zip(labels, scores))
            counted += len(traced) + len(probes)
            out.append(TokenRead(features, traced, probes))
        self.values_read += counted
        return out

    def next_tokens(self, count: int) -> list[TokenRead]:
        """The next `count` generated tokens (each read from the residual that predicted it), as the last
        `settle` found them."""
        first, self.next_token = self.next_token, self.next_token + count
        if self.prompt_len is None:  # not one record arrived
            return [self._nothing() for _ in range(count)]
        return self._tokens(range(self.prompt_len - 1 + first, self.prompt_len - 1 + first + count))

    def _nothing(self) -> TokenRead:
        return TokenRead(
            dict.fromkeys(self.request.inspected),
            [None] * len(self.request.traced),
            {pid: None for pid in self.request.probes if pid in self.probes},
        )

    def prompt_tokens(self) -> list[TokenRead]:
        self._pull()
        if self.prompt_len is None:
            return []
        return self._tokens(range(self.prompt_len))

    def abort(self) -> dict | None:
        """Which abort_when condition stopped the request and at which generated token (the token that was not
        generated: index k = the k-th generated token, read from the residual that would have predicted it).
        A forced end whose record came after the token is reported once `settle(..., last=True)` waited for it."""
        self._pull()
        if self.prompt_len is None:
            return None
        on_probe = self.probe_aborted
        if on_probe is not None and (self.aborted is None or on_probe[0] < self.aborted.pos):
            return self._probe_abort(*on_probe)
        if self.aborted is None:
            return None
        index, activation = self.aborted.abort
        sae_id = self.aborted.sae
        cond = next((a for a in self.request.abort if a.sae == sae_id and a.index == index), None)
        bound = "above" if cond is None or cond.sign > 0 else "below"
        return {
            "sae": sae_id,
            "index": index,
            "label": self.labels_of(sae_id).get(index),
            "activation": activation,
            bound: None if cond is None else cond.threshold,
            "token": self.aborted.pos - (self.prompt_len - 1),
        }

    def _probe_abort(self, pos: int, probe: str, column: int, score: float) -> dict:
        cond = next(a for a in self.request.planned.probe_abort if a.probe == probe and a.column == column)
        window = {"window": cond.window} if cond.window > 1 else {}  # `score`: that window's mean
        return {
            "probe": probe,
            "label": self.probes[probe].labels[column],
            "score": score,
            "above" if cond.sign > 0 else "below": cond.threshold,
            "token": pos - (self.prompt_len - 1),
            **window,
        }

    def probe_summary(self, probe_ids=None) -> dict[str, dict[str, dict]]:
        """Per probe (those the request asked for, unless `probe_ids`) and label, the aggregates
        (probes/aggregate.py) of its scores over the generated tokens read so far (each read from the residual
        that predicted it), attention sinks left out."""
        self._pull()
        if self.prompt_len is None:
            return {}
        first = self.prompt_len - 1
        out: dict[str, dict[str, dict]] = {}
        for pid in self.request.probes if probe_ids is None else probe_ids:
            meta = self.probes[pid]
            rows = [
                s[pid]
                for pos, s in sorted(self.scores.items())
                if pos >= first and pid in s and pos not in self.sinks
            ]
            out[pid] = {}
            for c, label in enumerate(meta.labels):
                found = aggregate([row[c] for row in rows], meta.window)
                out[pid][label] = None if found is None else found._asdict()
        return out

    def traced_features(self) -> list[dict]:
        """The features `traced` reports, in order."""
        return [
            {"sae": sae_id, "index": index, "label": self.labels_of(sae_id).get(index)}
            for sae_id, index in self.request.traced
        ]

    def finish(self, response_id: str | None, model: str | None) -> None:
        """Write the monitoring line and watchlist counts (of what arrived: `settle(..., last=True)` first waits
        for the last token's reads); close the request's mailbox, however that goes."""
        try:
            metrics.OBSERVATION_VALUES.inc(self.values_read)
            self._report(response_id, model)
        finally:
            self.inbox.close(self.cid)

    def _report(self, response_id: str | None, model: str | None) -> None:
        abort = self.abort()  # (reads what is left first)
        config = self.monitoring
        if abort is not None:  # every stopped request is counted and logged, sampled or not
            if "probe" in abort:
                metrics.PROBE_ABORTED_REQUESTS.labels(probe=abort["probe"]).inc()
            else:
                metrics.ABORTED_REQUESTS.labels(sae=abort["sae"]).inc()
            monitor_log.write(
                config, {"event": "abort", "request_id": response_id, "model": model, "abort": abort}
            )
        monitored_probes = [p for p in self.request.planned.monitored_probes if p in self.probes]
        if monitored_probes:
            record = {
                "request_id": response_id,
                "model": model,
                "steered": bool(self.request.ops),
                "abort": abort,
            }
            probe_monitor.report(self.probe_summary(monitored_probes), config, record)
        for sae_id in self.request.monitored:
            labels = self.labels_of(sae_id)
            # Attention sinks (config monitoring.sink_positions) carry no meaning: left out of every figure.
            records = [r for r in self.records if r.sae == sae_id and not r.sink]
            sinks = sum(1 for r in self.records if r.sae == sae_id and r.sink)
            watch = []
            for w in (w for w in config.watchlist if w.sae == sae_id):
                # The workers test every watched feature on every token (not just the top K).
                fired = sum(1 for r in records if any(i == w.index and a > w.threshold for i, a in r.watch))
                if fired:
                    metrics.WATCHLIST_FIRINGS.labels(sae=sae_id, feature=str(w.index)).inc(fired)
                    watch.append(
                        {
                            "index": w.index,
                            "label": labels.get(w.index),
                            "threshold": w.threshold,
                            "tokens": fired,
                        }
                    )
            metrics.MONITORED_REQUESTS.labels(sae=sae_id).inc()
            monitor_log.write(
                config,
                {
                    "request_id": response_id,
                    "model": model,
                    "sae": sae_id,
                    "num_tokens": len(records),
                    "sink_tokens": sinks,
                    "steered": bool(self.request.ops),
                    "top_features": monitor_log.summarise(records, sae_id, labels, config.top_k),
                    "watchlist": watch,
                    "abort": abort,
                },
            )
