"""Prometheus metrics for steering, served on the inference server's own /metrics.

Request-level figures are counted in the API server, in prometheus_client Counters: with
PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported (vLLM sets it for `--api-server-count` > 1,
before it spawns the API servers) they live in that directory's per-process files, and /metrics sums the API
processes. Worker figures (steered tokens, op time, feature L0 and reconstruction error, SAE memory) live in the
worker processes; `WorkerStatsCollector` exposes the last snapshot pulled from them (the middleware pulls one per
scrape, in whichever API process serves it, so they are counted once). Per-feature labels appear only for
watchlist features, so label cardinality stays bounded.

Every label value known in advance gets a zero series at start-up (`initialize_series`, and the collector's
known kinds), so that `rate()`/`increase()` and alerts see the first event, and dashboards show 0, not "no data".
"""

from __future__ import annotations

import re

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics

from steer_plugin.messages import HistogramCounts, WorkerStats
from steer_plugin.request.ops import OP_NAMES

STEERED_REQUESTS = Counter("steer_requests", "Requests with steering, by operation they use", ["op"])
REJECTED_REQUESTS = Counter("steer_rejected_requests", "Requests rejected by the steering plugin", ["reason"])
WATCHLIST_FIRINGS = Counter(
    "steer_watchlist_firings",
    "Tokens on which a watchlist feature fired above its threshold",
    ["sae", "feature"],
)
MONITORED_REQUESTS = Counter("steer_monitored_requests", "Requests logged by steering monitoring", ["sae"])
ABORTED_REQUESTS = Counter(
    "steer_aborted_requests", "Requests stopped by one of their abort_when conditions, by SAE", ["sae"]
)
PROBE_REQUEST_SCORE = Histogram(
    "steer_probe_request_score",
    "Per-request aggregate of a monitored probe's scores over the generated tokens (config monitoring.probes)",
    ["probe", "label", "aggregate"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 2.0, 5.0, 10.0, float("inf")),
)
PROBE_ALERTS = Counter(
    "steer_probe_alerts",
    "Monitored requests whose probe aggregate passed the rule's `above` (config monitoring.probes)",
    ["probe", "label"],
)
PROBE_ABORTED_REQUESTS = Counter(
    "steer_probe_aborted_requests", "Requests stopped by an abort_when condition on a probe", ["probe"]
)
PROBE_AGGREGATES = ("max", "window_max")  # the aggregates steer_probe_request_score records
JUDGE_VERDICTS = Counter(
    "steer_judge_verdicts",
    "Judge calls of the probe cascade (monitoring.judge), by verdict: positive, negative, timeout, error, "
    "rate_limited (a crossing not judged: over judge_per_minute)",
    ["probe", "verdict"],
)
JUDGE_SECONDS = Histogram(
    "steer_judge_seconds",
    "Time a judge call of the probe cascade took (answered ones)",
    ["probe"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")),
)
JUDGE_OUTCOMES = ("positive", "negative", "timeout", "error", "rate_limited")
RUNTIME_LOADS = Counter(
    "steer_runtime_loads",
    "SAE, vector and probe loads and unloads through the admin API, by outcome",
    ["kind", "action", "outcome"],
)
CATALOG_GENERATION = Gauge(
    "steer_runtime_catalog_generation",
    "Generation of the runtime-load catalog this API process serves (the workers' registry's when it last "
    "read it; one series per API process, labelled pid, with --api-server-count > 1)",
    multiprocess_mode="all",
)

OBSERVATION_COST = Counter(
    "steer_observation_cost",
    "Token-encodes charged to observing requests (steer_plugin/observation.py): observed prompt positions x "
    "(1 + SAEs) and generated positions x SAEs",
    ["kind"],
)
OBSERVATION_VALUES = Counter("steer_observation_values", "Feature values streamed to observing requests")
OBSERVATION_IN_FLIGHT = Gauge(
    "steer_observation_in_flight",
    "Token-encodes of the observing requests running now",
    multiprocess_mode="livesum",
)
OBSERVATION_WAIT = Histogram(
    "steer_observation_wait_seconds",
    "Time observing requests waited for room under policy.observation.max_cost_in_flight",
    buckets=(0.0, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")),
)
OBSERVATION_REFUSED = Counter(
    "steer_observation_refused",
    "Observing requests refused: over a per-request bound (request, 403) or no room in time (busy, 429)",
    ["reason"],
)
OBSERVATION_DROPPED = Counter(
    "steer_observation_dropped",
    "Observation messages (or a message's part for one request: its records, its rows of a block) this API"
    " process refused (monitor/inbox.py): MAC does not verify (unauthenticated), undecodable (malformed), for a"
    " request it never opened (unowned) or has finished (late), or over a request's mailbox bound (overflow)",
    ["reason"],
)
OBSERVATION_OPEN = Gauge(
    "steer_observation_open_requests",
    "Observed requests whose mailbox is open (from before the engine sees them to the end of the response)",
    multiprocess_mode="livesum",
)

REJECT_REASONS = ("invalid", "policy")  # 400 / 403
OBSERVATION_DROP_REASONS = ("unauthenticated", "malformed", "unowned", "late", "overflow")
OBSERVATION_COST_KINDS = ("prompt", "generation")
OBSERVATION_REFUSALS = ("request", "busy")
RUNTIME_LOAD_OUTCOMES = ("ok", "refused", "failed")  # refused: a 4xx/507 answer; failed: a worker error
WORKER_REJECT_KINDS = ("steering", "capacity")  # see Steerer._reject and config.working_set_rows


def initialize_series(config, probe_labels: dict[str, tuple[str, ...]] | None = None) -> None:
    """Zero-valued series for every label value known from the config (a `SteerConfig`): ops, rejection
    reasons, watchlist features, monitored SAEs and, given their labels (probe.json), monitored probes.
    Idempotent."""
    for probe_id, rule in config.monitoring.probes.items():
        labels = (probe_labels or {}).get(probe_id, ())
        for label in labels:
            for aggregate in PROBE_AGGREGATES:
                PROBE_REQUEST_SCORE.labels(probe=probe_id, label=label, aggregate=aggregate)
        if rule.above is not None and labels:
            PROBE_ALERTS.labels(probe=probe_id, label=rule.label or labels[0])
        if rule.judge_above is not None:
            for verdict in JUDGE_OUTCOMES:
                JUDGE_VERDICTS.labels(probe=probe_id, verdict=verdict)
    for op in OP_NAMES:
        STEERED_REQUESTS.labels(op=op)
    for reason in REJECT_REASONS:
        REJECTED_REQUESTS.labels(reason=reason)
    for w in config.monitoring.watchlist:
        WATCHLIST_FIRINGS.labels(sae=w.sae, feature=str(w.index))
    for sae_id, sampling in config.monitoring.saes.items():
        if sampling.sample_rate > 0:
            MONITORED_REQUESTS.labels(sae=sae_id)
    for sae in config.saes:
        ABORTED_REQUESTS.labels(sae=sae.id)
    for probe in config.probes:
        PROBE_ABORTED_REQUESTS.labels(probe=probe.id)
    for kind in OBSERVATION_COST_KINDS:
        OBSERVATION_COST.labels(kind=kind)
    for reason in OBSERVATION_REFUSALS:
        OBSERVATION_REFUSED.labels(reason=reason)
    for reason in OBSERVATION_DROP_REASONS:
        OBSERVATION_DROPPED.labels(reason=reason)
    if config.runtime is not None:
        for kind in ("sae", "vector", "probe"):
            for action in ("load", "unload"):
                for outcome in RUNTIME_LOAD_OUTCOMES:
                    RUNTIME_LOADS.labels(kind=kind, action=action, outcome=outcome)


# API-side families labelled by SAE alone (watchlist features are configured SAEs, never unloaded)
PER_SAE = (ABORTED_REQUESTS, MONITORED_REQUESTS)


def forget_sae(sae_id: str) -> None:
    """Drop the API-side series of an SAE unloaded at runtime (the workers drop theirs with it), so series do
    not accumulate with load/unload churn. A later load under the same id starts from zero."""
    for family in PER_SAE:
        try:
            family.remove(sae_id)
        except KeyError:
            pass


def _merge(snapshots: list[WorkerStats]) -> WorkerStats:
    """Sum worker snapshots (pipeline ranks own different layers; tensor ranks compute the same, rank 0 counts)."""
    merged = WorkerStats()
    for snap in snapshots:
        merged.step_errors += snap.step_errors
        merged.bank_bytes += snap.bank_bytes
        merged.tokens_observed += snap.tokens_observed
        merged.observation_dropped += snap.observation_dropped
        for into, add in (
            (merged.steered_tokens, snap.steered_tokens),
            (merged.features_applied, snap.features_applied),
            (merged.rejected_messages, snap.rejected_messages),
        ):
            for k, v in add.items():
                into[k] = into.get(k, 0) + v
        merged.op_seconds += snap.op_seconds
        merged.sae_bytes.update(snap.sae_bytes)
        for into, add in ((merged.l0, snap.l0), (merged.reconstruction_error, snap.reconstruction_error)):
            for sae, h in add.items():
                m = into.get(sae)
                if m is None:
                    into[sae] = HistogramCounts(h.buckets, list(h.counts), h.sum)
                else:
                    into[sae] = m._replace(
                        counts=[a + b for a, b in zip(m.counts, h.counts)], sum=m.sum + h.sum
                    )
    return merged


class WorkerStatsCollector:
    """Custom collector over the latest worker snapshots."""

    def __init__(self):
        self.snapshot: WorkerStats = _merge([])

    def update(self, snapshots: list[WorkerStats]) -> None:
        self.snapshot = _merge(one_per_stage(snapshots))

    def collect(self):
        s = self.snapshot
        steered = CounterMetricFamily(
            "steer_steered_tokens", "Token-operation pairs steered in the workers", labels=["op"]
        )
        for op, n in sorted(s.steered_tokens.items()):
            steered.add_metric([op], n)
        yield steered
        applied = CounterMetricFamily(
            "steer_features_applied", "Feature operations applied, by SAE", labels=["sae"]
        )
        applied_by_sae = {**dict.fromkeys(s.sae_bytes, 0), **s.features_applied}  # every loaded SAE
        for sae, n in sorted(applied_by_sae.items()):
            applied.add_metric([sae], n)
        yield applied
        rejected = CounterMetricFamily(
            "steer_worker_rejected_messages",
            "Steering/observation messages the workers dropped (unsigned, malformed, or over the working set):"
            " those requests ran unsteered",
            labels=["kind"],
        )
        kinds = {**dict.fromkeys(WORKER_REJECT_KINDS, 0), **s.rejected_messages}
        for kind, n in sorted(kinds.items()):
            rejected.add_metric([kind], n)
        yield rejected
        yield CounterMetricFamily(
            "steer_worker_observation_dropped",
            "Observation records a worker could not queue for its API process (a slow or gone process): those"
            " tokens are reported as missing",
            value=s.observation_dropped,
        )
        yield CounterMetricFamily(
            "steer_worker_step_errors",
            "Engine steps whose steering or observation failed and ran unsteered",
            value=s.step_errors,
        )
        yield CounterMetricFamily(
            "steer_op_seconds", "Host time in the steering op (eager executions)", value=s.op_seconds
        )
        memory = GaugeMetricFamily(
            "steer_sae_memory_bytes", "Device memory of each SAE's encoder and decoder", labels=["sae"]
        )
        for sae, n in sorted(s.sae_bytes.items()):
            memory.add_metric([sae], n)
        yield memory
        for histograms, name, doc in (
            (s.l0, "steer_active_features", "Active SAE features per observed token (L0)"),
            (
                s.reconstruction_error,
                "steer_reconstruction_error",
                "Relative SAE reconstruction error |x-x̂|²/|x|² on observed tokens",
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["sae"])
            for sae, h in sorted(histograms.items()):
                cumulative, running = [], 0
                for bound, count in zip([*h.buckets, float("inf")], h.counts):
                    running += count
                    cumulative.append((str(float(bound)) if bound != float("inf") else "+Inf", running))
                family.add_metric([sae], cumulative, h.sum)
            yield family


def one_per_stage(snapshots: list[WorkerStats | None]) -> list[WorkerStats]:
    """Pipeline stages own different layers and are summed; the tensor ranks of a stage compute the same
    thing, so only tensor rank 0 of each stage counts (told apart by the ranks each worker reports)."""
    return [s for s in snapshots if s is not None and s.tp_rank == 0]


WORKER_STATS = WorkerStatsCollector()
# The worker families alone, for a /metrics answer built from another registry (see with_worker_families).
WORKER_REGISTRY = CollectorRegistry(auto_describe=True)
WORKER_REGISTRY.register(WORKER_STATS)
_registered = False
_WORKER_FAMILY = re.compile(rb"^# TYPE steer_worker_step_errors(?:_total)? ", re.MULTILINE)
OPENMETRICS_TYPE = "application/openmetrics-text"


def register_worker_collector() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(WORKER_STATS)
        _registered = True


def with_worker_families(body: bytes, content_type: str) -> bytes:
    """A /metrics exposition (`content_type`: Prometheus text or OpenMetrics) with the worker families added
    when it lacks them: a server whose /metrics does not read prometheus_client's global REGISTRY (vLLM in
    multiprocess mode) would otherwise drop them. Unchanged when they are already there."""
    if _WORKER_FAMILY.search(body):
        return body
    if content_type.lower().startswith(OPENMETRICS_TYPE):
        extra = openmetrics.generate_latest(WORKER_REGISTRY)  # ends with "# EOF"
        stripped = body.rstrip()
        if stripped.endswith(b"# EOF"):
            body = stripped[: -len(b"# EOF")]
        return body + extra
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return body + generate_latest(WORKER_REGISTRY)
