"""The steering metrics as a real Prometheus sees them: Debian's `prometheus` scrapes the real server (1 s) with
deploy/prometheus/steer-rules.yml loaded, and every steer_* series is checked through its HTTP API.

Twice: one API server process, and two (`steer-serve --api-server-count 2`, which runs `vllm serve`), where
vLLM sets PROMETHEUS_MULTIPROC_DIR and answers /metrics from the multiprocess files only (the plugin adds its
worker families back, and its API-side counters are summed over the processes, each request counted once).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..test_prometheus_rules import RULES, referenced_metrics
from ..tools import require_tool
from .conftest import running_server, write_monitored_config
from .probe_checks import config_entries, make_probes

pytestmark = pytest.mark.server

PORT = 18771 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
WATCHED = 100  # watchlist feature (clamped so that it fires)
DENIED = 666  # policy-denied feature
MESSAGES = [{"role": "user", "content": "Describe a famous landmark in one sentence."}]
CLAMP = {"features": [{"sae": "demo", "index": WATCHED, "op": "clamp", "value": 60.0}]}
EACH_OP = {
    "add": {"features": [{"sae": "demo", "index": 5, "op": "add", "value": 2.0}]},
    "scale": {"features": [{"sae": "demo", "index": 5, "op": "scale", "value": 2.0}]},
    "ablate": {"features": [{"sae": "demo", "index": 5, "op": "ablate"}]},
    "vector": {"vectors": [{"name": "unit", "scale": 2.0}]},
}
INVALID = {"features": [{"sae": "no-such-sae", "index": 1, "op": "clamp", "value": 1.0}]}  # 400
DENIED_SPEC = {"features": [{"sae": "demo", "index": DENIED, "op": "clamp", "value": 1.0}]}  # 403

# The families README's "Monitoring and metrics" documents, as exposed (a dropped family fails here even when
# nothing else names it).
DOCUMENTED = {
    "steer_requests_total",
    "steer_steered_tokens_total",
    "steer_features_applied_total",
    "steer_rejected_requests_total",
    "steer_watchlist_firings_total",
    "steer_active_features_bucket",
    "steer_active_features_sum",
    "steer_active_features_count",
    "steer_reconstruction_error_bucket",
    "steer_reconstruction_error_sum",
    "steer_reconstruction_error_count",
    "steer_op_seconds_total",
    "steer_sae_memory_bytes",
    "steer_monitored_requests_total",
    "steer_aborted_requests_total",
    "steer_worker_rejected_messages_total",
    "steer_worker_step_errors_total",
    "steer_probe_request_score_bucket",
    "steer_probe_request_score_sum",
    "steer_probe_request_score_count",
    "steer_probe_alerts_total",
    "steer_probe_aborted_requests_total",
}


# --- the servers ---------------------------------------------------------------------------------------------


class Server(NamedTuple):
    mode: str
    base: str
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def server_config(demo_assets, steer_config_path, sae_layer, tmp_path_factory) -> str:
    """The demo SAE monitored on all traffic with a watchlist, and a denied feature; a probe monitored on all
    traffic whose rule flags every request (a sigmoid's max is always above 0)."""
    folder = tmp_path_factory.mktemp("prometheus-server")
    path = write_monitored_config(steer_config_path, folder, WATCHED, DENIED)
    config = json.loads(open(path).read())
    config["probes"] = config_entries(make_probes(folder, sae_layer))
    config["monitoring"]["probes"] = {"concept": {"aggregate": "max", "above": 0.0}}
    open(path, "w").write(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["one-api-server", "two-api-servers"])
def server(request, demo_assets, server_config):
    if request.param == "one-api-server":
        serving = running_server(demo_assets.model_dir, server_config, PORT)
    else:
        # steer-serve runs `vllm serve` for this (api/serve.py), which makes its own multiprocess dir.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        serving = running_server(
            demo_assets.model_dir, server_config, PORT, "--api-server-count", "2", env=env
        )
    with serving as proc:
        yield Server(request.param, f"http://127.0.0.1:{PORT}", proc)


# --- the server's own /metrics -------------------------------------------------------------------------------


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}; a fresh connection each time (with several API server
    processes, each scrape may be answered by another one)."""
    text = requests.get(f"{base}/metrics", timeout=30, headers={"Connection": "close"}).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def names(samples: dict, prefix: str = "steer_") -> set[str]:
    return {n for n, _ in samples if n.startswith(prefix)}


def chat(base: str, steering: dict | None, max_tokens: int = 6) -> requests.Response:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    return requests.post(
        f"{base}/v1/chat/completions", json=body, timeout=120, headers={"Connection": "close"}
    )


def send_traffic(base: str, clamps: int = 3) -> dict[str, int]:
    """Every op, steered + inspected + rejected requests; what each counter should have gained."""
    for _ in range(clamps):
        assert chat(base, CLAMP).status_code == 200
    for spec in EACH_OP.values():
        assert chat(base, spec, max_tokens=2).status_code == 200
    assert chat(base, None, max_tokens=2).status_code == 200
    inspect = requests.post(
        f"{base}/v1/steering/inspect", json={"text": "The bridge at night", "top_k": 3}, timeout=120
    )
    assert inspect.status_code == 200, inspect.text
    assert chat(base, INVALID).status_code == 400
    assert chat(base, DENIED_SPEC).status_code == 403
    return {"clamp": clamps, **dict.fromkeys(EACH_OP, 1), "invalid": 1, "policy": 1, "monitored": clamps + 6}


def stable_scrapes(base: str, times: int = 8, timeout: float = 30) -> dict:
    """The steer_* samples once `times` scrapes in a row agree on every value (with two API processes, both
    answer some of them: values that differ between processes never settle)."""
    deadline = time.time() + timeout
    first, agreeing = None, 0
    while agreeing < times:
        steer = {k: v for k, v in scrape(base).items() if k[0].startswith("steer_")}
        if steer == first:
            agreeing += 1
            continue
        assert first is None or time.time() < deadline, {
            k: (first.get(k), v) for k, v in steer.items() if first.get(k) != v
        }
        first, agreeing = steer, 1
    return first


def test_every_family_on_metrics_counted_once(server):
    before = stable_scrapes(server.base)
    assert DOCUMENTED <= names(before), f"missing on /metrics: {sorted(DOCUMENTED - names(before))}"
    sent = send_traffic(server.base)
    after = stable_scrapes(server.base)  # the monitoring of the last request may still be finishing
    deadline = time.time() + 10
    while (
        value(after, "steer_monitored_requests_total")
        < value(before, "steer_monitored_requests_total") + sent["monitored"]
    ):
        assert time.time() < deadline, "monitored requests not counted"
        time.sleep(0.5)
        after = stable_scrapes(server.base)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # API-side counters: exactly what was sent (each request counted once, whichever process served it)
    for op in ("clamp", *EACH_OP):
        assert delta("steer_requests_total", op=op) == sent[op], op
    assert delta("steer_rejected_requests_total", reason="invalid") == 1
    assert delta("steer_rejected_requests_total", reason="policy") == 1
    assert delta("steer_monitored_requests_total", sae="demo") == sent["monitored"]
    assert delta("steer_watchlist_firings_total", sae="demo", feature=str(WATCHED)) >= 5 * sent["clamp"]
    # worker figures: pulled from the workers by the process that answers
    assert delta("steer_steered_tokens_total", op="clamp") >= 6 * sent["clamp"]
    for op in ("add", "scale", "ablate", "vector"):
        assert delta("steer_steered_tokens_total", op=op) >= 2, op
    assert delta("steer_features_applied_total", sae="demo") == sent["clamp"] + 3  # add, scale, ablate
    assert delta("steer_reconstruction_error_count", sae="demo") >= 6 * sent["clamp"]
    assert delta("steer_active_features_count", sae="demo") >= 6 * sent["clamp"]
    assert delta("steer_op_seconds_total") > 0
    assert value(after, "steer_sae_memory_bytes", sae="demo") > 0
    assert value(after, "steer_worker_step_errors_total") == 0
    assert value(after, "steer_worker_rejected_messages_total") == 0
    for family in ("steer_reconstruction_error", "steer_active_features"):  # +Inf bucket == count
        assert value(after, f"{family}_bucket", sae="demo", le="+Inf") == value(
            after, f"{family}_count", sae="demo"
        )
    # no steer_* sample twice (a family both in vLLM's registry and added by the plugin would be)
    text = requests.get(f"{server.base}/metrics", timeout=30).text
    typed = re.findall(r"^# TYPE (steer_\w+) ", text, flags=re.MULTILINE)
    assert len(typed) == len(set(typed)), typed
    if server.mode == "two-api-servers":
        assert_multiprocess_mode(server)


def assert_multiprocess_mode(server: Server) -> None:
    """The multi-process case is what it claims: two API processes writing PROMETHEUS_MULTIPROC_DIR files."""
    children = subprocess.run(
        ["pgrep", "-g", str(server.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    dirs = set()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        dirs |= {e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")}
    assert len(dirs) == 1, dirs
    folder = Path(dirs.pop())
    # each API server process writes its own file, with the plugin's counters (its middleware declares them)
    writers = [f.name for f in folder.glob("counter_*.db") if b"steer_requests" in f.read_bytes()]
    assert len(writers) == 2, writers


def test_dashboard_and_rules_read_only_metrics_the_server_exposes(server):
    assert chat(server.base, None, max_tokens=2).status_code == 200  # vLLM's gauges appear with traffic
    exposed = set().union(*({n for n, _ in scrape(server.base)} for _ in range(4)))
    for source, used in referenced_metrics().items():
        assert used, source
        assert used <= exposed, f"{source} reads metrics the server does not expose: {sorted(used - exposed)}"


# --- Prometheus ----------------------------------------------------------------------------------------------


class Prom(NamedTuple):
    base: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **params):
        reply = requests.get(f"{self.base}{path}", params=params, timeout=30)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["status"] == "success", data
        return data["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        return {
            tuple(sorted(r["metric"].items())): float(r["value"][1])
            for r in self.get("/api/v1/query", query=expr)["result"]
        }

    def wait(self, what: str, check, timeout: float = 60):
        deadline = time.time() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.time() > deadline:
                pytest.fail(f"Prometheus: {what} (log: {self.log.read_text()[-2000:]})")
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prom(server, tmp_path_factory):
    """Prometheus scraping the server every second with the steering rules, after some traffic, and with
    more traffic once the target is up (so that rates and the recorded series have something to show)."""
    binary = require_tool("prometheus", "prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "steer", "static_configs": [{"targets": [f"127.0.0.1:{PORT}"]}]}],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))
    log = folder / "prometheus.log"
    cmd = [
        binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=info",
    ]  # fmt: skip
    send_traffic(server.base, clamps=1)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    p = Prom(f"http://127.0.0.1:{port}", proc, log)
    try:

        def ready():
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            try:
                return requests.get(f"{p.base}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        p.wait("not ready", ready)
        p.wait(
            "the server's target is not up",
            lambda: [t for t in p.get("/api/v1/targets")["activeTargets"] if t["health"] == "up"],
        )
        sent = send_traffic(server.base)
        served = stable_scrapes(server.base)
        want = value(served, "steer_requests_total", op="clamp")
        p.wait(  # the last traffic is scraped
            "steer_requests_total{op=clamp} never reached the server's value",
            lambda: sum(p.query('steer_requests_total{op="clamp"}').values()) >= want,
        )
        yield p, sent
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_prometheus_has_every_steer_series(server, prom):
    p, sent = prom
    served = stable_scrapes(server.base)
    expected = names(served)
    assert DOCUMENTED <= expected
    stored = set(p.get("/api/v1/label/__name__/values", **{"match[]": '{__name__=~"steer_.+"}'}))
    assert expected <= stored, f"not in Prometheus: {sorted(expected - stored)}"
    # each series with its labels, as the server exposes it (Prometheus adds job and instance)
    series = p.get("/api/v1/series", **{"match[]": '{__name__=~"steer_.+", job="steer"}'})
    in_prom = {
        (s.pop("__name__"), tuple(sorted((k, v) for k, v in s.items() if k not in ("job", "instance"))))
        for s in series
    }
    assert set(served) <= in_prom, sorted(set(served) - in_prom)[:10]
    # sensible values (Prometheus's latest scrape, every label set summed)
    q = lambda expr: sum(p.query(expr).values())  # noqa: E731
    assert q('steer_requests_total{op="clamp"}') >= 1 + sent["clamp"]
    for op in EACH_OP:
        assert q(f'steer_requests_total{{op="{op}"}}') >= 2, op
    assert q('steer_rejected_requests_total{reason="invalid"}') >= 2
    assert q('steer_rejected_requests_total{reason="policy"}') >= 2
    assert q(f'steer_watchlist_firings_total{{sae="demo", feature="{WATCHED}"}}') >= 5 * sent["clamp"]
    assert q('steer_monitored_requests_total{sae="demo"}') >= sent["monitored"]
    assert q('steer_steered_tokens_total{op="clamp"}') >= 6 * sent["clamp"]
    assert q('steer_features_applied_total{sae="demo"}') >= sent["clamp"] + 3
    assert q("steer_op_seconds_total") > 0
    assert q('steer_sae_memory_bytes{sae="demo"}') > 0
    assert q("steer_worker_step_errors_total") == 0 and q("steer_worker_rejected_messages_total") == 0
    error = q('steer_reconstruction_error_sum{sae="demo"}') / q(
        'steer_reconstruction_error_count{sae="demo"}'
    )
    l0 = q('steer_active_features_sum{sae="demo"}') / q('steer_active_features_count{sae="demo"}')
    assert 0 < error < 2 and 1 <= l0 <= 4096, (error, l0)


def test_recording_rules_evaluate_and_no_worker_alert(prom):
    p, _ = prom
    p.wait(
        "rules not all evaluated without error",
        lambda: all(
            r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2")
            for g in p.get("/api/v1/rules")["groups"]
            for r in g["rules"]
        ),
    )
    groups = {g["name"]: g for g in p.get("/api/v1/rules")["groups"]}
    assert set(groups) == {"steer.recording", "steer.alerts"}
    for rule in (r for g in groups.values() for r in g["rules"]):
        assert rule["health"] == "ok", rule
    rate = p.wait(
        "job_op:steer_requests:rate5m{op=clamp} not > 0",
        lambda: sum(p.query('job_op:steer_requests:rate5m{job="steer", op="clamp"}').values()),
    )
    assert rate > 0
    for recorded in (
        "job_sae:steer_reconstruction_error:mean_rate5m",
        "job_sae:steer_reconstruction_error:p95_rate5m",
        "job_sae:steer_active_features:mean_rate5m",
        "job:steer_rejected_requests:ratio_rate5m",
        "job_sae_feature:steer_watchlist_firings:rate5m",
    ):
        values = p.wait(f"{recorded} not recorded", lambda r=recorded: p.query(f'{r}{{job="steer"}}'))
        assert all(v == v and v >= 0 for v in values.values()), (recorded, values)  # not NaN
    mean_error = p.query('job_sae:steer_reconstruction_error:mean_rate5m{sae="demo"}')
    assert all(0 < v < 2 for v in mean_error.values()), mean_error
    active = {a["labels"]["alertname"] for a in p.get("/api/v1/alerts")["alerts"]}
    assert not active & {
        "SteerWorkerStepErrors",
        "SteerWorkerRejectedMessages",
        "SteerWorkerMetricsMissing",
    }, active
