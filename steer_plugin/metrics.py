"""Prometheus metrics for steering, served on the inference server's own /metrics.

Request-level figures are counted in the API server. Worker figures (steered tokens, op time, feature L0 and
reconstruction error, SAE memory) live in the worker processes; `WorkerStatsCollector` exposes the last
snapshot pulled from them (the middleware pulls one per scrape). Per-feature labels appear only for
watchlist features, so label cardinality stays bounded.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

STEERED_REQUESTS = Counter("steer_requests", "Requests with steering, by operation they use", ["op"])
REJECTED_REQUESTS = Counter("steer_rejected_requests", "Requests rejected by the steering plugin", ["reason"])
WATCHLIST_FIRINGS = Counter(
    "steer_watchlist_firings",
    "Tokens on which a watchlist feature fired above its threshold",
    ["sae", "feature"],
)
MONITORED_REQUESTS = Counter("steer_monitored_requests", "Requests logged by steering monitoring", ["sae"])


def _merge(snapshots: list[dict]) -> dict:
    """Sum worker snapshots (pipeline ranks own different layers; tensor ranks compute the same, rank 0 counts)."""
    merged: dict = {
        "steered_tokens": {},
        "features_applied": {},
        "op_seconds": 0.0,
        "sae_bytes": {},
        "l0": {},
        "reconstruction_error": {},
        "rejected_messages": {},
        "step_errors": 0,
    }
    for snap in snapshots:
        if not snap:
            continue
        merged["step_errors"] += snap.get("step_errors", 0)
        for key in ("steered_tokens", "features_applied", "rejected_messages"):
            for k, v in snap.get(key, {}).items():
                merged[key][k] = merged[key].get(k, 0) + v
        merged["op_seconds"] += snap.get("op_seconds", 0.0)
        merged["sae_bytes"].update(snap.get("sae_bytes", {}))
        for key in ("l0", "reconstruction_error"):
            for sae, h in snap.get(key, {}).items():
                if sae not in merged[key]:
                    merged[key][sae] = {"buckets": h["buckets"], "counts": list(h["counts"]), "sum": h["sum"]}
                else:
                    m = merged[key][sae]
                    m["counts"] = [a + b for a, b in zip(m["counts"], h["counts"])]
                    m["sum"] += h["sum"]
    return merged


class WorkerStatsCollector:
    """Custom collector over the latest worker snapshots."""

    def __init__(self):
        self.snapshot: dict = _merge([])

    def update(self, snapshots: list[dict]) -> None:
        self.snapshot = _merge(one_per_stage(snapshots))

    def collect(self):
        s = self.snapshot
        steered = CounterMetricFamily(
            "steer_steered_tokens", "Token-operation pairs steered in the workers", labels=["op"]
        )
        for op, n in sorted(s["steered_tokens"].items()):
            steered.add_metric([op], n)
        yield steered
        applied = CounterMetricFamily(
            "steer_features_applied", "Feature operations applied, by SAE", labels=["sae"]
        )
        for sae, n in sorted(s["features_applied"].items()):
            applied.add_metric([sae], n)
        yield applied
        rejected = CounterMetricFamily(
            "steer_worker_rejected_messages",
            "Steering/observation messages the workers dropped (unsigned or malformed): run unsteered",
            labels=["kind"],
        )
        for kind, n in sorted(s["rejected_messages"].items()):
            rejected.add_metric([kind], n)
        yield rejected
        yield CounterMetricFamily(
            "steer_worker_step_errors",
            "Engine steps whose steering or observation failed and ran unsteered",
            value=s["step_errors"],
        )
        yield CounterMetricFamily(
            "steer_op_seconds", "Host time in the steering op (eager executions)", value=s["op_seconds"]
        )
        memory = GaugeMetricFamily(
            "steer_sae_memory_bytes", "Device memory of each SAE's encoder and decoder", labels=["sae"]
        )
        for sae, n in sorted(s["sae_bytes"].items()):
            memory.add_metric([sae], n)
        yield memory
        for key, name, doc in (
            ("l0", "steer_active_features", "Active SAE features per observed token (L0)"),
            (
                "reconstruction_error",
                "steer_reconstruction_error",
                "Relative SAE reconstruction error |x-x̂|²/|x|² on observed tokens",
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["sae"])
            for sae, h in sorted(s[key].items()):
                cumulative, running = [], 0
                for bound, count in zip([*h["buckets"], float("inf")], h["counts"]):
                    running += count
                    cumulative.append((str(float(bound)) if bound != float("inf") else "+Inf", running))
                family.add_metric([sae], cumulative, h["sum"])
            yield family


def one_per_stage(snapshots: list[dict]) -> list[dict]:
    """Pipeline stages own different layers and are summed; the tensor ranks of a stage compute the same
    thing, so only tensor rank 0 of each stage counts (told apart by the ranks each worker reports)."""
    return [s for s in snapshots if s and s.get("ranks", {}).get("tp", 0) == 0]


WORKER_STATS = WorkerStatsCollector()
_registered = False


def register_worker_collector() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(WORKER_STATS)
        _registered = True
