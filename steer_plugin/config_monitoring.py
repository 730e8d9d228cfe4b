"""The `monitoring` section of the operator configuration: which SAEs and probes read served traffic, the
log sink, the watchlist and the attention-sink positions."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

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


class JudgeConfig(StrictModel):
    """An OpenAI-compatible chat endpoint (another vLLM, or this server) that judges conversations a probe
    flags (`judge_above`). A judge that fails or times out is counted and never affects the answer."""

    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
    """Base URL of the server (its /v1/chat/completions is called)."""
    model: str = Field(max_length=256)
    """Model name the judge serves."""
    prompt: str = Field(
        default="Does the assistant's answer in this conversation discuss {probe}? Answer yes or no.\n\n{conversation}",
        max_length=16384,
    )
    """The judge's user message: `{conversation}` is replaced by the conversation so far (one "role: text" line
    per message, the answer so far last), `{probe}` by the probe id and label."""
    positive: str = Field(default=r"^\s*yes\b", max_length=256)
    """A verdict is positive when the judge's answer matches this regular expression (case-insensitive)."""
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    """A judge call that takes longer is abandoned and counted as `timeout`."""
    max_tokens: int = Field(default=8, ge=1, le=4096)
    """Tokens the judge may answer with."""
    api_key_env: str | None = None
    """Environment variable holding the judge's API key (sent as a Bearer token)."""

    @field_validator("positive")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return value


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
    abort_above: float | None = None
    """The operator's stop: a monitored request ends at the first generated token whose score (of `label`) passes
    this, as `abort_when` would (finish_reason "abort_when"); not applied to requests that cannot be stopped at a
    token (ignore_eos, min_tokens, structured output)."""
    judge_above: float | None = None
    """Cascade to the judge (monitoring.judge): the first generated token whose score (of `label`) passes this
    sends the conversation so far to the judge; its verdict is logged and counted (unset: never judged)."""
    judge_per_minute: int = Field(default=10, ge=1, le=100_000)
    """Most judge calls this probe makes per minute in one API process; crossings beyond are counted as
    `rate_limited` and not judged."""
    judge: JudgeConfig | None = None
    """This probe's judge and prompt (unset: monitoring.judge)."""
    stop_on_positive: bool = False
    """Stop a still-streaming answer when the judge's verdict is positive (finish_reason "judge")."""


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
    judge: JudgeConfig | None = None
    """Where probes with `judge_above` send the conversations they flag."""
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
        judged = [pid for pid, r in self.probes.items() if r.judge_above is not None and r.judge is None]
        if judged and self.judge is None:
            raise ValueError(f"monitoring.probes.{judged[0]}.judge_above needs monitoring.judge")
        return self
