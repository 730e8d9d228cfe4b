"""deploy/prometheus (rules and their unit tests) and deploy/grafana (dashboard): checked with the real
promtool. The metric names they use are checked against a real server in tests/integration/test_prometheus.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "steer-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "steer-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "steer-dashboard.json"
DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# A metric name in a PromQL expression: not part of a longer name, nor a recorded series (level:metric:op).
_METRIC = re.compile(r"(?<![\w:])(steer_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
# Grafana's variables, replaced by something PromQL parses.
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def load_yaml(path: Path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def dashboard_exprs(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and the variables' label_values() queries."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert m, f"variable {var['name']}: unexpected query {query}"
            exprs.append(m.group(1))
    return exprs


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names (as exposed: with _total, _bucket, ...) that the rules and the dashboard read."""
    return {
        "rules": {m for e in rule_exprs() for m in _METRIC.findall(e)},
        "dashboard": {m for e in dashboard_exprs() for m in _METRIC.findall(e)},
    }


# --- promtool ----------------------------------------------------------------------------------------------


def test_rules_pass_promtool_check():
    out = subprocess.run(
        [require_tool("promtool", "prometheus"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_unit_tests_pass():
    out = subprocess.run(
        [require_tool("promtool", "prometheus"), "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = {r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 6
    fired, quiet = set(), set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts <= fired, f"alerts never tested firing: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts never tested quiet: {sorted(alerts - quiet)}"
    recorded = {r["record"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "record" in r}
    tested = {
        name
        for case in load_yaml(RULES_TEST)["tests"]
        for check in case.get("promql_expr_test", [])
        for name in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", check["expr"])
    }
    for name in ("job:steer_rejected_requests:ratio_rate5m", "job_sae:steer_reconstruction_error:p95_rate5m"):
        assert name in recorded and name in tested


# --- the dashboard -----------------------------------------------------------------------------------------


def test_dashboard_is_provisionable_and_complete():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    assert "__inputs" not in dashboard  # file provisioning does not substitute import inputs
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance", "sae"):
        assert variables[name]["datasource"] == DS_REF
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF and t["expr"], p["title"]
            assert 'job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"], p["title"]
    # The panels the issue asks for: what each reads.
    used = referenced_metrics()["dashboard"]
    for metric in (
        "steer_requests_total",  # steering rate by op
        "steer_features_applied_total",
        "steer_rejected_requests_total",  # rejections by reason
        "steer_watchlist_firings_total",
        "steer_reconstruction_error_bucket",  # drift
        "steer_reconstruction_error_sum",
        "steer_op_seconds_total",  # op time
        "steer_active_features_bucket",  # L0
        "steer_active_features_count",
        "steer_worker_step_errors_total",
        "steer_worker_rejected_messages_total",
    ):
        assert metric in used, metric


def test_dashboard_queries_parse_as_promql(tmp_path):
    """Every dashboard query, Grafana variables filled in, as a recording rule: promtool parses it."""
    exprs = []
    for expr in dashboard_exprs():
        for var, value in _GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        exprs.append(re.sub(r"\$\{?(\w+)\}?", r".*", expr))  # $job -> .* inside the =~ matchers
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dash:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    out = subprocess.run(
        [require_tool("promtool", "prometheus"), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(exprs)} rules found" in out.stdout
