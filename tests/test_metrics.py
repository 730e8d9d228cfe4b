"""Worker figures merged for /metrics: pipeline stages summed, tensor ranks of a stage counted once."""

import dataclasses

from steer_plugin.messages import HistogramCounts, WorkerStats
from steer_plugin.metrics import WorkerStatsCollector


def snapshot(pp: int, tp: int, tokens: int, rejected: int = 0) -> WorkerStats:
    return WorkerStats(
        pp_rank=pp,
        tp_rank=tp,
        steered_tokens={"add": tokens},
        features_applied={},
        op_seconds=1.0,
        sae_bytes={},  # equal on stages that own no SAE: must not be taken for tensor copies
        l0={},
        reconstruction_error={},
        rejected_messages={"steering": rejected},
        step_errors=0,
    )


def test_pipeline_stages_are_summed_and_tensor_copies_counted_once():
    collector = WorkerStatsCollector()
    collector.update([snapshot(0, 0, 5, 1), snapshot(0, 1, 5, 1), snapshot(1, 0, 7, 2), snapshot(1, 1, 7, 2)])
    assert collector.snapshot.steered_tokens == {"add": 12}
    assert collector.snapshot.rejected_messages == {"steering": 3}
    assert collector.snapshot.op_seconds == 2.0
    collector.update([snapshot(0, 0, 5), snapshot(1, 0, 7)])  # PP=2 with equal (empty) SAE bytes
    assert collector.snapshot.steered_tokens == {"add": 12}


def test_worker_families_as_prometheus_reads_them():
    """Two pipeline stages' snapshots through the collector, read back with prometheus_client's own text
    parser: counters summed, per-bucket counts made cumulative (le buckets, +Inf, _count, _sum), gauges kept."""
    from prometheus_client import CollectorRegistry, generate_latest

    first = dataclasses.replace(
        snapshot(0, 0, 5, 1),
        features_applied={"s": 4},
        op_seconds=0.25,
        sae_bytes={"s": 1000},
        step_errors=2,
        l0={"s": HistogramCounts(buckets=[1, 2, 4], counts=[1, 0, 2, 1], sum=14.0)},
        reconstruction_error={"s": HistogramCounts(buckets=[0.1, 0.5], counts=[2, 1, 0], sum=0.4)},
    )
    second = dataclasses.replace(
        snapshot(1, 0, 7),
        steered_tokens={"add": 7, "clamp": 3},
        sae_bytes={"t": 500},
        l0={"s": HistogramCounts(buckets=[1, 2, 4], counts=[0, 1, 1, 0], sum=5.0)},
    )
    collector = WorkerStatsCollector()
    collector.update(
        [first, second, snapshot(1, 1, 99, 9)]
    )  # the last: a tensor copy of stage 1, not counted
    registry = CollectorRegistry()
    registry.register(collector)
    families = _families(generate_latest(registry).decode())
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("steer_steered_tokens_total", (("op", "add"),))] == 12
    assert value[("steer_steered_tokens_total", (("op", "clamp"),))] == 3
    assert value[("steer_features_applied_total", (("sae", "s"),))] == 4
    assert value[("steer_features_applied_total", (("sae", "t"),))] == 0  # loaded, never applied
    assert value[("steer_worker_rejected_messages_total", (("kind", "steering"),))] == 1
    assert value[("steer_worker_step_errors_total", ())] == 2
    assert value[("steer_op_seconds_total", ())] == 1.25  # 0.25 + 1.0 (stage 1's default)
    assert value[("steer_sae_memory_bytes", (("sae", "s"),))] == 1000
    assert value[("steer_sae_memory_bytes", (("sae", "t"),))] == 500
    # l0 per bucket, stages summed: [1, 1, 3, 1]; cumulative: 1, 2, 5, 6.
    for le, want in (("1.0", 1), ("2.0", 2), ("4.0", 5), ("+Inf", 6)):
        assert value[("steer_active_features_bucket", (("le", le), ("sae", "s")))] == want, le
    assert value[("steer_active_features_count", (("sae", "s"),))] == 6
    assert value[("steer_active_features_sum", (("sae", "s"),))] == 19.0
    for le, want in (("0.1", 2), ("0.5", 3), ("+Inf", 3)):
        assert value[("steer_reconstruction_error_bucket", (("le", le), ("sae", "s")))] == want, le
    assert value[("steer_reconstruction_error_sum", (("sae", "s"),))] == 0.4
    assert families["steer_sae_memory_bytes"].type == "gauge"
    assert families["steer_active_features"].type == "histogram"


# --- zero series for known label values ----------------------------------------------------------------------


def test_initialize_series_declares_known_label_values_at_zero():
    from prometheus_client import REGISTRY

    from steer_plugin import metrics
    from steer_plugin.config import SteerConfig

    config = SteerConfig.model_validate(
        {
            "saes": [{"id": "zero-a", "path": "/nonexistent"}, {"id": "zero-b", "path": "/nonexistent"}],
            "monitoring": {
                "saes": {"zero-a": {"sample_rate": 0.5}, "zero-b": {"sample_rate": 0.0}},
                "watchlist": [{"sae": "zero-a", "index": 7, "threshold": 1.0}],
            },
        }
    )
    metrics.initialize_series(config)
    metrics.initialize_series(config)  # idempotent
    value = REGISTRY.get_sample_value
    for op in ("add", "clamp", "scale", "ablate", "vector"):  # every op a request can use (README's table)
        assert value("steer_requests_total", {"op": op}) is not None
    assert value("steer_rejected_requests_total", {"reason": "policy"}) is not None
    assert value("steer_rejected_requests_total", {"reason": "invalid"}) is not None
    assert value("steer_watchlist_firings_total", {"sae": "zero-a", "feature": "7"}) == 0
    assert value("steer_monitored_requests_total", {"sae": "zero-a"}) == 0
    assert value("steer_monitored_requests_total", {"sae": "zero-b"}) is None  # not monitored
    for sae in ("zero-a", "zero-b"):  # every configured SAE may abort a request
        assert value("steer_aborted_requests_total", {"sae": sae}) == 0


def test_initialize_series_declares_runtime_load_outcomes_when_runtime_loading_is_configured(tmp_path):
    from prometheus_client import REGISTRY

    from steer_plugin import metrics
    from steer_plugin.config import SteerConfig

    config = SteerConfig.model_validate(
        {"runtime": {"layers": [3], "rows_per_layer": 8, "roots": [str(tmp_path)]}}
    )
    metrics.initialize_series(config)
    declared = {
        (s.labels["kind"], s.labels["action"], s.labels["outcome"])
        for f in REGISTRY.collect()
        if f.name == "steer_runtime_loads"
        for s in f.samples
        if s.name == "steer_runtime_loads_total"
    }
    assert declared == {
        (kind, action, outcome)
        for kind in ("sae", "vector", "probe")
        for action in ("load", "unload")
        for outcome in ("ok", "refused", "failed")
    }


def test_worker_collector_emits_known_kinds_and_every_sae_at_zero():
    collector = WorkerStatsCollector()
    snap = snapshot(0, 0, 3)
    snap.rejected_messages = {}
    snap.sae_bytes = {"a": 10, "b": 20}
    snap.features_applied = {"b": 4}
    collector.update([snap])
    families = {f.name: f for f in collector.collect()}
    kinds = {s.labels["kind"]: s.value for s in families["steer_worker_rejected_messages"].samples}
    assert kinds == {"steering": 0, "capacity": 0}
    applied = {s.labels["sae"]: s.value for s in families["steer_features_applied"].samples}
    assert applied == {"a": 0, "b": 4}


# --- the worker families in an answer built from another registry (vLLM's multiprocess mode) --------------


def _families(text: str, openmetrics_format: bool = False) -> dict:
    if openmetrics_format:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


WORKER_FAMILIES = {
    "steer_steered_tokens",
    "steer_features_applied",
    "steer_worker_rejected_messages",
    "steer_worker_step_errors",
    "steer_op_seconds",
    "steer_sae_memory_bytes",
    "steer_active_features",
    "steer_reconstruction_error",
}


def test_with_worker_families_adds_them_once_to_a_text_answer():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from steer_plugin.metrics import WORKER_STATS, with_worker_families

    WORKER_STATS.update([snapshot(0, 0, 9)])
    other = CollectorRegistry()
    Counter("vllm:thing", "a vLLM metric", registry=other).inc(2)
    body = generate_latest(other)
    merged = with_worker_families(body, "text/plain; version=1.0.0; charset=utf-8")
    families = _families(merged.decode())
    assert WORKER_FAMILIES <= set(families) and "vllm:thing" in families
    steered = {s.labels["op"]: s.value for s in families["steer_steered_tokens"].samples if s.labels}
    assert steered["add"] == 9
    assert with_worker_families(merged, "text/plain") == merged  # already there: unchanged
    unterminated = with_worker_families(body.rstrip(b"\n"), "text/plain").decode()  # a last line without "\n"
    assert WORKER_FAMILIES | {"vllm:thing"} <= set(_families(unterminated))
    assert unterminated.count("# TYPE steer_steered_tokens") == 1


def test_with_worker_families_keeps_openmetrics_valid():
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest

    from steer_plugin.metrics import with_worker_families

    other = CollectorRegistry()
    Counter("vllm_thing", "a vLLM metric", registry=other).inc()
    merged = with_worker_families(generate_latest(other), CONTENT_TYPE_LATEST).decode()
    assert merged.count("# EOF") == 1 and merged.endswith("# EOF\n")
    assert WORKER_FAMILIES | {"vllm_thing"} <= set(_families(merged, openmetrics_format=True))


MULTIPROC_CHILD = """
import sys
from steer_plugin import metrics
from steer_plugin.config import SteerConfig

metrics.initialize_series(SteerConfig())
for _ in range(int(sys.argv[1])):
    metrics.STEERED_REQUESTS.labels(op="clamp").inc()
metrics.REJECTED_REQUESTS.labels(reason="policy").inc()
"""

MULTIPROC_SERVER = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from steer_plugin.messages import WorkerStats
from steer_plugin.metrics import WORKER_STATS, register_worker_collector, with_worker_families

register_worker_collector()  # on the global REGISTRY, as the middleware does: not what is served here
WORKER_STATS.update([WorkerStats(tp_rank=0, steered_tokens={"clamp": 11}, step_errors=1)])
registry = CollectorRegistry()  # what vLLM serves /metrics from in multiprocess mode
multiprocess.MultiProcessCollector(registry)
print(with_worker_families(generate_latest(registry), "text/plain").decode())
"""


def test_multiprocess_mode_sums_api_processes_and_adds_worker_families(tmp_path):
    """Two API processes count in PROMETHEUS_MULTIPROC_DIR's files; a third serves /metrics as vLLM does in
    multiprocess mode (a fresh registry with a MultiProcessCollector): the API counters are summed, counted once
    each, and the worker families are added."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", MULTIPROC_CHILD, str(n)], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-c", MULTIPROC_SERVER], env=env, check=True, capture_output=True, text=True
    ).stdout
    families = _families(out)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("steer_requests_total", (("op", "clamp"),))] == 5
    assert samples[("steer_requests_total", (("op", "add"),))] == 0
    assert samples[("steer_rejected_requests_total", (("reason", "policy"),))] == 2
    assert samples[("steer_rejected_requests_total", (("reason", "invalid"),))] == 0
    assert samples[("steer_steered_tokens_total", (("op", "clamp"),))] == 11
    assert samples[("steer_worker_step_errors_total", ())] == 1
    assert WORKER_FAMILIES <= set(families)


# --- the middleware's /metrics answer (worker families added by rewrite_response) --------------------------


def _serve(app, headers=()):
    import asyncio

    from steer_adapters.vllm.api.asgi import rewrite_response
    from steer_plugin.metrics import with_worker_families

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": list(headers)}
    asyncio.run(rewrite_response(app, scope, receive, send, with_worker_families))
    return sent


def _app(status: int, chunks: list[bytes], content_type: bytes = b"text/plain; version=1.0.0; charset=utf-8"):
    seen = {}

    async def app(scope, receive, send):
        seen["headers"] = scope["headers"]
        length = str(sum(map(len, chunks))).encode()
        headers = [(b"content-type", content_type), (b"content-length", length)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

    return app, seen


def test_serve_metrics_adds_worker_families_with_a_right_content_length():
    app, seen = _app(200, [b"# TYPE vllm:x counter\n", b"vllm:x_total 1.0\n"])
    sent = _serve(app, headers=[(b"accept-encoding", b"gzip"), (b"accept", b"text/plain")])
    assert seen["headers"] == [(b"accept", b"text/plain")]  # asked uncompressed
    start, body = sent
    assert start["status"] == 200 and body["type"] == "http.response.body" and not body.get("more_body")
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()
    families = _families(body["body"].decode())
    assert WORKER_FAMILIES | {"vllm:x"} <= set(families)


def test_serve_metrics_passes_errors_and_compressed_answers_through():
    app, _ = _app(500, [b"oops"])
    assert [m.get("body") for m in _serve(app)] == [None, b"oops"]
    app, _ = _app(200, [b"\x1f\x8b..."])

    async def gzipped(scope, receive, send):  # an answer compressed anyway: left as it is
        async def add_encoding(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"content-encoding", b"gzip")]}
            await send(message)

        await app(scope, receive, add_encoding)

    assert _serve(gzipped)[1]["body"] == b"\x1f\x8b..."
