"""Monitoring of probes (config monitoring.probes): for each monitored probe of a finished request, its
aggregates go to the steer_probe_request_score histograms, the operator's rule flags the request when the
chosen aggregate passes `above` (steer_probe_alerts_total), and one line goes to the monitoring log."""

from __future__ import annotations

from steer_plugin import metrics
from steer_plugin.config import MonitoringConfig
from steer_plugin.monitor import log as monitor_log

Summary = dict[str, dict[str, dict | None]]  # probe -> label -> aggregates (Observation.probe_summary)


def alerts(summary: Summary, config: MonitoringConfig) -> list[dict]:
    """The monitored probes whose rule flags this request."""
    out = []
    for probe_id, aggregates in summary.items():
        rule = config.probes.get(probe_id)
        if rule is None or rule.above is None:
            continue
        label = rule.label or next(iter(aggregates))
        found = aggregates.get(label)
        if found is not None and found[rule.aggregate] > rule.above:
            out.append(
                {
                    "probe": probe_id,
                    "label": label,
                    rule.aggregate: found[rule.aggregate],
                    "above": rule.above,
                }
            )
    return out


def report(summary: Summary, config: MonitoringConfig, record: dict) -> None:
    """Histograms, alerts and the monitoring line (`record`: request_id, model, steered, abort)."""
    for probe_id, aggregates in summary.items():
        for label, found in aggregates.items():
            if found is None:
                continue
            for name in metrics.PROBE_AGGREGATES:
                metrics.PROBE_REQUEST_SCORE.labels(probe=probe_id, label=label, aggregate=name).observe(
                    found[name]
                )
    flagged = alerts(summary, config)
    for alert in flagged:
        metrics.PROBE_ALERTS.labels(probe=alert["probe"], label=alert["label"]).inc()
    monitor_log.write(config, {"event": "probes", **record, "probes": summary, "alerts": flagged})
