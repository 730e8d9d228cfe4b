"""The `monitoring` section of the operator configuration: which SAEs and probes read served traffic, the
log sink, the watchlist and the attention-sink positions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from steer_plugin.config_sources import StrictModel


class FeatureKey(StrictModel):
    sae: str
    """SAE id."""
    index: int = Field(ge=0)
    """Feature index."""


class WatchItem(FeatureKey):
    """A feature to flag in monitoring logs and count in metrics when it fires above `threshold`."""

    threshold: float = 0.0
    """Activation above which a firing is counted."""


class SAEMonitoring(StrictModel):
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of requests whose tokens are read with this SAE and logged."""


class ProbeMonitoring(StrictModel):
    """A probe scored on the generated tokens of sampled traffic: its per-request aggregates logged and counted
    (steer_probe_request_score), and a rule for requests that score high."""

    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of requests whose generated tokens this probe scores."""
    label: str | None = None
    """The probe's label the rule reads (unset: its first label)."""
    aggregate: Literal["max", "mean", "window_max"] = "window_max"
    """The per-request aggregate the rule compares with `above` (probes/aggregate.py)."""
    above: float | None = None
    """A request whose aggregate passes this is flagged: logged as an alert and counted in
    steer_probe_alerts_total (unset: nothing is flagged)."""


class MonitoringConfig(StrictModel):
    """Structured logging of the active features of served traffic."""

    saes: dict[str, SAEMonitoring] = Field(default_factory=dict)
    """SAE id -> sampling. SAEs not listed are not monitored."""
    top_k: int = Field(default=5, ge=1, le=64)
    """Features per token kept in the log."""
    sink: Literal["stdout", "file"] = "stdout"
    """`stdout`: the `steer_plugin.monitor` logger; `file`: JSON lines appended to `path`."""
    path: str | None = None
    """File for the `file` sink."""
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    """`file` sink: the file is rotated (renamed to `path.1`, `path.2`, ...) before it grows past this many
    bytes; 0: never rotated (then rotate it outside the server, e.g. logrotate's copytruncate)."""
    backup_count: int = Field(default=5, ge=1, le=1000)
    """`file` sink: rotated files kept (`path.1` .. `path.N`); older ones are deleted."""
    probes: dict[str, ProbeMonitoring] = Field(default_factory=dict)
    """Probe id -> sampling and rule. Probes not listed are scored only when a request asks (inspect.probes)."""
    watchlist: list[WatchItem] = Field(default_factory=list)
    """Features flagged (and counted in steer_watchlist_firings_total) when they fire above their threshold."""
    sink_positions: int = Field(default=1, ge=0, le=64)
    """Token positions 0..N-1 are attention sinks: their residual is huge (about 100x the others' norm on the demo
    model) and their features mean nothing. They are flagged in inspect (`sink`), and left out of monitoring's top
    features, watchlist counts, the L0 / reconstruction-error histograms and abort_when."""

    @model_validator(mode="after")
    def _path_for_file(self) -> MonitoringConfig:
        if self.sink == "file" and not self.path:
            raise ValueError("monitoring.path is required when monitoring.sink is `file`")
        return self
