"""The per-request `steering` field: schema, resolution against the loaded SAEs, and the wire format.

A request names features and vectors; `resolve_spec` checks them against the catalog of what the server
loaded and turns them into `ResolvedOp`s (layer, bank entry, coefficients). Those travel to the workers as
one JSON string in SamplingParams.extra_args[WIRE_KEY] (vLLM only carries flat values there).

Every operation becomes x' = x + c·d at its layer, with d the feature's decoder row (or the vector) and
    c = a·f_i(x) + b            (+ bn·|x|/|d| for normalised adds)
    add: a=0, b=v    clamp: a=-1, b=v    scale: a=v-1, b=0    ablate: a=-1, b=0    vector: a=0, b=scale
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steer_plugin import signing

WIRE_KEY = "steer_plugin"
WIRE_VERSION = 2

Positions = Literal["all", "prompt", "generation"]
POSITION_CODES = {"all": 0, "prompt": 1, "generation": 2, "last_prompt_tokens": 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LastPromptTokens(_Strict):
    """Only the last N prompt tokens."""

    last_prompt_tokens: int = Field(ge=1, le=1_000_000)


class FeatureRef(_Strict):
    """One SAE feature, named by (sae, index), by `id` or by `label`."""

    sae: str | None = None
    """SAE id from the server config (with `index` or `label`)."""
    index: int | None = Field(default=None, ge=0)
    """Feature index within the SAE."""
    id: str | None = None
    """Neuronpedia-style id `model/source/index`."""
    label: str | None = None
    """A label from the SAE's labels file; must be unique (within `sae` when given)."""

    @model_validator(mode="after")
    def _named_once(self) -> FeatureRef:
        if self.id is None and self.label is None and (self.sae is None or self.index is None):
            raise ValueError(
                "name the feature by `sae` + `index`, by `id` (model/source/index) or by `label`"
            )
        if self.id is not None and (self.sae is not None or self.index is not None or self.label is not None):
            raise ValueError("`id` cannot be combined with `sae`, `index` or `label`")
        if self.label is not None and self.index is not None:
            raise ValueError("give `index` or `label`, not both")
        return self


class FeatureOp(FeatureRef):
    """One operation on one SAE feature. Name the feature by (sae, index), by `id` or by `label`."""

    op: Literal["add", "clamp", "scale", "ablate"] = "add"
    """add: x += v·W_dec[i]; clamp: set f_i to v; scale: f_i *= v; ablate: f_i = 0."""
    value: float | None = None
    """add: amount; clamp: target activation; scale: factor; not used by ablate."""
    normalize: bool = False
    """add only: `value` is a fraction of the residual norm |x| (direction normalised to unit length)."""
    positions: Positions | LastPromptTokens = "all"
    """Token positions the operation applies to. `generation` = generated tokens (positions >= prompt length)."""

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _check(self) -> FeatureOp:
        if self.op == "ablate" and self.value is not None:
            raise ValueError("`ablate` takes no `value`")
        if self.op != "ablate" and self.value is None:
            raise ValueError(f"`{self.op}` needs a `value`")
        if self.normalize and self.op != "add":
            raise ValueError("`normalize` applies to `add` only")
        return self


class VectorOp(_Strict):
    """Add a configured raw steering vector: x += scale·vector."""

    name: str
    """Vector id from the server config."""
    scale: float = 1.0
    """Multiplier (or fraction of |x| when `normalize`)."""
    normalize: bool = False
    """Scale the unit-length vector by `scale`·|x|."""
    positions: Positions | LastPromptTokens = "all"

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


MAX_TRACED = 16


class InspectSpec(_Strict):
    """Report the top-K active features of each generated token (read from the residual that predicted it)."""

    top_k: int = Field(default=5, ge=1, le=64)
    saes: list[str] | None = None
    """SAE ids to read (all loaded SAEs when unset)."""
    prompt: bool = False
    """Also report the features of every prompt token."""
    features: list[FeatureRef] = Field(default_factory=list, max_length=MAX_TRACED)
    """Features whose activation is reported on every token (`traced`), whether or not they are in the top K:
    a feature's activation over the whole text."""


class SteeringSpec(_Strict):
    """The `steering` field of a completion request."""

    features: list[FeatureOp] = Field(default_factory=list)
    vectors: list[VectorOp] = Field(default_factory=list)
    inspect: InspectSpec | None = None
    compare: bool = False
    """Also return the default (unsteered) completion of the same request: the steered choices first, then the
    default ones (indices n..2n-1), each labelled in `steering.variant` ("steered" / "default"), streaming too."""


class SpecError(ValueError):
    """A steering field is invalid. `path` is the JSON path of the bad field (e.g. steering.features[1].value)."""

    def __init__(self, path: str, message: str, status: int = 400):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.status = status


def _json_path(prefix: str, loc: tuple) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("LastPromptTokens", "literal['all','prompt','generation']") or "literal[" in str(part):
            continue
        else:
            path += f".{part}"
    return path


def parse_spec(data: object, prefix: str = "steering") -> SteeringSpec:
    """Validate the raw `steering` JSON; raises SpecError naming the JSON path of the first bad field."""
    if isinstance(data, SteeringSpec):
        return data
    try:
        return SteeringSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown field"
        raise SpecError(_json_path(prefix, first["loc"]), msg) from None


# --- resolution against what the server loaded ------------------------------------------------------------


class SAEInfo(NamedTuple):
    """What request resolution needs to know about a loaded SAE."""

    id: str
    layer: int
    d_sae: int
    neuronpedia_id: str | None
    labels: dict[int, str]


class VectorInfo(NamedTuple):
    id: str
    layer: int


class Catalog(NamedTuple):
    saes: dict[str, SAEInfo]
    vectors: dict[str, VectorInfo]
    max_ops_per_request: int = 32
    max_ops_per_layer: int = 8
    max_abs_value: float = 1e4


class ResolvedOp(NamedTuple):
    """One operation, ready for the workers."""

    kind: Literal["feature", "vector"]
    source: str  # SAE id or vector id
    index: int  # feature index (0 for vectors)
    layer: int
    a: float
    b: float
    bn: float
    positions: int  # POSITION_CODES value
    last_n: int  # for positions == last_prompt_tokens
    op: str = "add"  # add, clamp, scale, ablate or vector (for metrics and the response)


def _positions(p: Positions | LastPromptTokens) -> tuple[int, int]:
    if isinstance(p, LastPromptTokens):
        return POSITION_CODES["last_prompt_tokens"], p.last_prompt_tokens
    return POSITION_CODES[p], 0


def _coefficients(op: str, value: float | None, normalize: bool) -> tuple[float, float, float]:
    if op == "add":
        return (0.0, 0.0, value) if normalize else (0.0, value, 0.0)
    if op == "clamp":
        return -1.0, value, 0.0
    if op == "scale":
        return value - 1.0, 0.0, 0.0
    return -1.0, 0.0, 0.0  # ablate


def _find_feature(op: FeatureRef, catalog: Catalog, path: str) -> tuple[SAEInfo, int]:
    if op.id is not None:
        source, _, index_text = op.id.rpartition("/")
        matches = [s for s in catalog.saes.values() if s.neuronpedia_id and s.neuronpedia_id == source]
        if not source or not index_text.isdigit():
            raise SpecError(f"{path}.id", "must look like `model/source/index`")
        if not matches:
            known = sorted(s.neuronpedia_id for s in catalog.saes.values() if s.neuronpedia_id)
            raise SpecError(f"{path}.id", f"unknown source {source!r}; loaded: {known}")
        return matches[0], int(index_text)
    if op.sae is not None and op.sae not in catalog.saes:
        raise SpecError(f"{path}.sae", f"unknown SAE {op.sae!r}; loaded: {sorted(catalog.saes)}")
    candidates = [catalog.saes[op.sae]] if op.sae is not None else list(catalog.saes.values())
    if op.label is not None:
        hits = [(s, i) for s in candidates for i, lab in s.labels.items() if lab == op.label]
        if not hits:
            raise SpecError(f"{path}.label", f"no feature is labelled {op.label!r}")
        if len(hits) > 1:
            where = ", ".join(f"{s.id}/{i}" for s, i in hits[:5])
            raise SpecError(f"{path}.label", f"label {op.label!r} is not unique ({where}); use sae + index")
        return hits[0]
    return candidates[0], op.index


def resolve_feature(ref: FeatureRef, catalog: Catalog, path: str) -> tuple[SAEInfo, int]:
    """The loaded SAE and feature index a reference names; SpecError naming `path` otherwise."""
    sae, index = _find_feature(ref, catalog, path)
    if not 0 <= index < sae.d_sae:
        field = "id" if ref.id is not None else "index"
        raise SpecError(
            f"{path}.{field}",
            f"feature index {index} out of range for SAE {sae.id!r} (0..{sae.d_sae - 1})",
        )
    return sae, index


def resolve_spec(spec: SteeringSpec, catalog: Catalog, prefix: str = "steering") -> list[ResolvedOp]:
    """Check a parsed spec against the catalog and limits; SpecError names the bad field."""
    ops: list[ResolvedOp] = []
    for i, op in enumerate(spec.features):
        path = f"{prefix}.features[{i}]"
        sae, index = resolve_feature(op, catalog, path)
        if op.value is not None and abs(op.value) > catalog.max_abs_value:
            raise SpecError(f"{path}.value", f"|value| must be <= {catalog.max_abs_value:g}")
        pos, last_n = _positions(op.positions)
        a, b, bn = _coefficients(op.op, op.value, op.normalize)
        ops.append(ResolvedOp("feature", sae.id, index, sae.layer, a, b, bn, pos, last_n, op.op))
    for i, op in enumerate(spec.vectors):
        path = f"{prefix}.vectors[{i}]"
        if op.name not in catalog.vectors:
            raise SpecError(f"{path}.name", f"unknown vector {op.name!r}; loaded: {sorted(catalog.vectors)}")
        if abs(op.scale) > catalog.max_abs_value:
            raise SpecError(f"{path}.scale", f"|scale| must be <= {catalog.max_abs_value:g}")
        pos, last_n = _positions(op.positions)
        b, bn = (0.0, op.scale) if op.normalize else (op.scale, 0.0)
        ops.append(
            ResolvedOp(
                "vector", op.name, 0, catalog.vectors[op.name].layer, 0.0, b, bn, pos, last_n, "vector"
            )
        )
    if len(ops) > catalog.max_ops_per_request:
        raise SpecError(
            f"{prefix}", f"too many operations ({len(ops)}); at most {catalog.max_ops_per_request}"
        )
    per_layer: dict[int, int] = {}
    for op in ops:
        per_layer[op.layer] = per_layer.get(op.layer, 0) + 1
        if per_layer[op.layer] > catalog.max_ops_per_layer:
            raise SpecError(
                f"{prefix}",
                f"too many operations at layer {op.layer}; at most {catalog.max_ops_per_layer} per layer",
            )
    return ops


def touches_prompt(ops: list[ResolvedOp]) -> bool:
    """Whether any op changes prompt-token residuals (then the request must not share prefix-cache blocks)."""
    return any(op.positions != POSITION_CODES["generation"] for op in ops)


# --- wire format ------------------------------------------------------------------------------------------

_OP_FIELDS = len(ResolvedOp._fields)
OP_NAMES = ("add", "clamp", "scale", "ablate", "vector")  # ResolvedOp.op
MAX_WIRE_OPS = 4096


def encode_wire(ops: list[ResolvedOp]) -> str:
    """The signed message a request's steering travels in (SamplingParams.extra_args[WIRE_KEY])."""
    return signing.sign(_ops_payload(ops))


def _ops_payload(ops: list[ResolvedOp]) -> str:
    return json.dumps({"v": WIRE_VERSION, "ops": [list(op) for op in ops]}, separators=(",", ":"))


def decode_wire(text: object) -> list[ResolvedOp]:
    """Verify and decode a steering message; ValueError (SignatureError) for anything we did not write."""
    data = json.loads(signing.verify(text))
    if not isinstance(data, dict) or data.get("v") != WIRE_VERSION:
        raise ValueError("unsupported steering wire version")
    raw = data.get("ops")
    if not isinstance(raw, list) or len(raw) > MAX_WIRE_OPS:
        raise ValueError("steering wire: `ops` must be a list")
    return [_checked_op(item) for item in raw]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_op(item: object) -> ResolvedOp:
    """Types and ranges of one decoded op (defence in depth behind the signature)."""
    if not isinstance(item, list) or len(item) != _OP_FIELDS:
        raise ValueError("steering wire: malformed op")
    op = ResolvedOp(*item)
    ok = (
        op.kind in ("feature", "vector")
        and isinstance(op.source, str)
        and _is_int(op.index)
        and op.index >= 0
        and _is_int(op.layer)
        and op.layer >= 0
        and all(isinstance(c, (int, float)) and math.isfinite(c) for c in (op.a, op.b, op.bn))
        and op.positions in POSITION_CODES.values()
        and _is_int(op.last_n)
        and op.last_n >= 0
        and op.op in OP_NAMES
    )
    if not ok:
        raise ValueError("steering wire: op field out of range")
    return op


def steering_salt(ops: list[ResolvedOp]) -> str | None:
    """Prefix-cache salt of KV computed under this steering (None when nothing is steered)."""
    if not ops:
        return None
    return "steer-" + hashlib.sha256(_ops_payload(ops).encode()).hexdigest()[:24]


def first_steered_position(ops: list[ResolvedOp], num_prompt_tokens: int) -> int | None:
    """The first token position whose residual any op changes. KV of earlier positions is computed exactly
    as without steering (attention is causal), so those blocks may be shared with everyone."""
    firsts = []
    for op in ops:
        if op.positions == POSITION_CODES["generation"]:
            firsts.append(num_prompt_tokens)
        elif op.positions == POSITION_CODES["last_prompt_tokens"]:
            firsts.append(max(0, num_prompt_tokens - op.last_n))
        else:
            firsts.append(0)
    return min(firsts) if firsts else None


# --- observation: which requests report active features ---------------------------------------------------

OBSERVE_KEY = "steer_plugin_observe"
RESERVED_KEYS = (WIRE_KEY, OBSERVE_KEY)
MAX_TOP_K = 64
_CID_CHARS = frozenset("0123456789abcdef")


class WatchSpec(NamedTuple):
    """A watchlist feature the workers test on every observed token (not only when it is in the top K)."""

    sae: str
    index: int
    threshold: float


# A watch threshold every activation passes: the feature's activation is reported on every observed token.
TRACE_THRESHOLD = -3.0e38


class ObserveSpec(NamedTuple):
    """What the workers should read for one request: SAEs, top-K, whether prompt tokens count too, the
    watchlist features of the monitored SAEs, and the SAEs whose L0 / reconstruction error feed monitoring."""

    cid: str  # correlation id: names the request's side-channel file (32 hex characters)
    saes: list[str]
    top_k: int
    prompt: bool
    watch: list[WatchSpec] = []
    stats: list[str] = []  # monitored SAEs: the worker decodes for the error and L0 histograms only for these

    def encode(self) -> str:
        payload = [self.cid, self.saes, self.top_k, self.prompt, [list(w) for w in self.watch], self.stats]
        return signing.sign(json.dumps(payload, separators=(",", ":")))

    @classmethod
    def decode(cls, text: object) -> ObserveSpec:
        """Verify and decode; ValueError for anything we did not write or that is out of range."""
        data = json.loads(signing.verify(text))
        if not isinstance(data, list) or len(data) != 6:
            raise ValueError("observe spec: malformed")
        cid, saes, top_k, prompt, watch, stats = data
        ok = (
            isinstance(cid, str)
            and len(cid) == 32
            and set(cid) <= _CID_CHARS
            and isinstance(saes, list)
            and all(isinstance(s, str) for s in saes)
            and _is_int(top_k)
            and 1 <= top_k <= MAX_TOP_K
            and isinstance(prompt, bool)
            and isinstance(watch, list)
            and all(
                isinstance(w, list)
                and len(w) == 3
                and isinstance(w[0], str)
                and _is_int(w[1])
                and w[1] >= 0
                and isinstance(w[2], (int, float))
                and math.isfinite(w[2])
                for w in watch
            )
            and isinstance(stats, list)
            and all(isinstance(s, str) for s in stats)
        )
        if not ok:
            raise ValueError("observe spec: field out of range")
        return cls(cid, saes, top_k, prompt, [WatchSpec(*w) for w in watch], stats)
