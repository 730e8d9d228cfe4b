"""The per-request `steering` field: schema, resolution against the loaded SAEs, and the wire format.

A request names features and vectors; `resolve_spec` checks them against the catalog of what the server
loaded and turns them into `ResolvedOp`s (layer, bank entry, coefficients). Those travel to the workers as
one JSON string in SamplingParams.extra_args[WIRE_KEY] (vLLM only carries flat values there).

Every operation becomes x' = x + c·d at its layer, with d the feature's decoder row (or the vector) and
    c = a·f_i(x) + b            (+ bn·|x|/|d| for normalised adds)
    add: a=0, b=v    clamp: a=-1, b=v    scale: a=v-1, b=0    ablate: a=-1, b=0    vector: a=0, b=scale
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steer_plugin import signing

WIRE_KEY = "steer_plugin"
WIRE_VERSION = 3

Positions = Literal["all", "prompt", "generation"]
POSITION_CODES = {"all": 0, "prompt": 1, "generation": 2, "last_prompt_tokens": 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)  # docstrings in /openapi.json


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


class Condition(FeatureRef):
    """A feature's activation compared with a threshold: `above` or `below` (exactly one)."""

    above: float | None = None
    """Holds where the feature's activation is > this value."""
    below: float | None = None
    """Holds where the feature's activation is < this value."""

    @field_validator("above", "below")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _one_bound(self) -> Condition:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of `above` or `below`")
        return self

    @property
    def sign(self) -> int:
        return 1 if self.above is not None else -1

    @property
    def threshold(self) -> float:
        return self.above if self.above is not None else self.below


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
    when: Condition | None = None
    """Apply only on tokens where this feature (at the same layer, read from the same residual before any
    operation) is above / below a threshold, e.g. "when feature A > 3, clamp feature B to 0"."""

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


MAX_INLINE_LENGTH = 65536  # d_model of the largest models served today is 16k; room to spare


class VectorOp(_Strict):
    """Add a raw steering vector: x += scale·vector. Either a configured one (`name`) or one sent inline
    (`values` or `base64`, with its `layer`), when the operator allows inline vectors."""

    name: str | None = None
    """Vector id from the server config."""
    values: list[float] | None = Field(default=None, max_length=MAX_INLINE_LENGTH)
    """Inline vector: d_model numbers."""
    base64: str | None = Field(default=None, max_length=4 * MAX_INLINE_LENGTH * 4 // 3 + 8)
    """Inline vector: base64 of little-endian `dtype` values (d_model of them)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Element type of `base64`."""
    layer: int | None = Field(default=None, ge=0)
    """Inline vectors: the decoder layer whose output it is added to (a layer the server steers)."""
    scale: float = 1.0
    """Multiplier (or fraction of |x| when `normalize`)."""
    normalize: bool = False
    """Scale the unit-length vector by `scale`·|x|."""
    positions: Positions | LastPromptTokens = "all"
    when: Condition | None = None
    """Apply only on tokens where this feature (at the vector's layer) is above / below a threshold."""

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("values")
    @classmethod
    def _finite_values(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("must be finite numbers")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> VectorOp:
        given = [k for k in ("name", "values", "base64") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `name` (a configured vector), `values` or `base64`")
        if self.name is not None and self.layer is not None:
            raise ValueError("`layer` is for inline vectors; a configured vector has its own")
        if self.name is None and self.layer is None:
            raise ValueError("an inline vector needs its `layer`")
        return self

    @property
    def inline(self) -> bool:
        return self.name is None


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
    abort_when: list[Condition] = Field(default_factory=list, max_length=8)
    """Stop generating when one of these features, read from the (steered) residual that predicts the next
    token, crosses its threshold: the choice ends before that token with finish_reason "abort_when" and
    `steering.abort` says which feature fired at which token."""
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
    revision: str = ""  # loaded at runtime: that load's revision ("" for configured SAEs)


class VectorInfo(NamedTuple):
    id: str
    layer: int
    revision: str = ""  # loaded at runtime: that load's revision ("" for configured vectors)


class Catalog(NamedTuple):
    saes: dict[str, SAEInfo]
    vectors: dict[str, VectorInfo]
    max_ops_per_request: int = 32
    max_ops_per_layer: int = 8
    max_abs_value: float = 1e4
    d_model: int | None = None  # residual width (inline vectors must have it)
    layers: tuple[int, ...] = ()  # layers the server steers (inline vectors may target these)


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
    # `when`: applies only where feature (cond_source, cond_index) at the same layer is above (cond_sign 1) or
    # below (-1) cond_threshold; cond_sign 0: always.
    cond_source: str = ""
    cond_index: int = -1
    cond_sign: int = 0
    cond_threshold: float = 0.0
    vector: str = ""  # kind "inline": the vector, base64 of little-endian float32 (d_model values)
    # Runtime-loaded sources: the load's revision, so a request never reads rows of an SAE or vector that was
    # unloaded (and maybe reloaded under the same id) after it was resolved, and prefix-cache salts differ.
    revision: str = ""
    cond_revision: str = ""


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


def inline_vector(op: VectorOp, path: str) -> np.ndarray:
    """An inline vector's values as float32 [d]; SpecError naming `path` when they do not decode or are not
    finite."""
    if op.values is not None:
        vec = np.asarray(op.values, dtype=np.float32)
        field = "values"
    else:
        field = "base64"
        try:
            raw = base64.b64decode(op.base64, validate=True)
        except (binascii.Error, ValueError):
            raise SpecError(f"{path}.base64", "is not valid base64") from None
        width = {"float32": 4, "bfloat16": 2, "float16": 2}[op.dtype]
        if len(raw) % width:
            raise SpecError(f"{path}.base64", f"length is not a multiple of {width} bytes ({op.dtype})")
        if op.dtype == "float32":
            vec = np.frombuffer(raw, dtype="<f4")
        elif op.dtype == "float16":
            vec = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        else:  # bfloat16: the upper half of a float32
            vec = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        vec = vec.astype(np.float32)
    if not np.isfinite(vec).all():
        raise SpecError(f"{path}.{field}", "must be finite numbers")
    return vec


def _encode_vector(vec: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode()


def decode_vector(text: str) -> np.ndarray:
    """The float32 values of an inline op's `vector` (as encode wrote them)."""
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").astype(np.float32)


def _condition(cond: Condition | None, layer: int, catalog: Catalog, path: str) -> dict:
    """ResolvedOp's cond_* fields."""
    if cond is None:
        return {}
    sae, index = resolve_feature(cond, catalog, f"{path}.when")
    if sae.layer != layer:
        raise SpecError(
            f"{path}.when",
            f"the condition's feature is read at layer {sae.layer}, the operation applies at layer {layer}; "
            "they must be at the same layer",
        )
    if abs(cond.threshold) > catalog.max_abs_value:
        raise SpecError(
            f"{path}.when.{'above' if cond.sign > 0 else 'below'}", f"must be <= {catalog.max_abs_value:g}"
        )
    return {
        "cond_source": sae.id,
        "cond_index": index,
        "cond_sign": cond.sign,
        "cond_threshold": float(cond.threshold),
        "cond_revision": sae.revision,
    }


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
        cond = _condition(op.when, sae.layer, catalog, path)
        ops.append(
            ResolvedOp(
                "feature",
                sae.id,
                index,
                sae.layer,
                a,
                b,
                bn,
                pos,
                last_n,
                op.op,
                **cond,
                revision=sae.revision,
            )
        )
    for i, op in enumerate(spec.vectors):
        path = f"{prefix}.vectors[{i}]"
        if abs(op.scale) > catalog.max_abs_value:
            raise SpecError(f"{path}.scale", f"|scale| must be <= {catalog.max_abs_value:g}")
        pos, last_n = _positions(op.positions)
        b, bn = (0.0, op.scale) if op.normalize else (op.scale, 0.0)
        if op.inline:
            if op.layer not in catalog.layers:
                raise SpecError(
                    f"{path}.layer",
                    f"layer {op.layer} is not steered on this server; steered: {list(catalog.layers)}",
                )
            vec = inline_vector(op, path)
            if vec.size != catalog.d_model:
                field = "values" if op.values is not None else "base64"
                raise SpecError(
                    f"{path}.{field}", f"has {vec.size} values; the model's d_model is {catalog.d_model}"
                )
            if not float(np.linalg.norm(vec.astype(np.float64))) > 0:
                raise SpecError(f"{path}.{'values' if op.values is not None else 'base64'}", "is all zeros")
            cond = _condition(op.when, op.layer, catalog, path)
            ops.append(
                ResolvedOp(
                    "inline",
                    "",
                    0,
                    op.layer,
                    0.0,
                    b,
                    bn,
                    pos,
                    last_n,
                    "vector",
                    **cond,
                    vector=_encode_vector(vec),
                )
            )
            continue
        if op.name not in catalog.vectors:
            raise SpecError(f"{path}.name", f"unknown vector {op.name!r}; loaded: {sorted(catalog.vectors)}")
        info = catalog.vectors[op.name]
        cond = _condition(op.when, info.layer, catalog, path)
        ops.append(
            ResolvedOp(
                "vector",
                op.name,
                0,
                info.layer,
                0.0,
                b,
                bn,
                pos,
                last_n,
                "vector",
                **cond,
                revision=info.revision,
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
        op.kind in ("feature", "vector", "inline")
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
        and isinstance(op.cond_source, str)
        and _is_int(op.cond_index)
        and op.cond_index >= -1
        and op.cond_sign in (-1, 0, 1)
        and isinstance(op.cond_threshold, (int, float))
        and math.isfinite(op.cond_threshold)
        and (op.cond_sign == 0 or (op.cond_source and op.cond_index >= 0))
        and isinstance(op.vector, str)
        and (op.kind == "inline") == bool(op.vector)
        and all(isinstance(r, str) and len(r) <= 64 for r in (op.revision, op.cond_revision))
    )
    if not ok:
        raise ValueError("steering wire: op field out of range")
    if op.vector and not np.isfinite(decode_vector(op.vector)).all():
        raise ValueError("steering wire: inline vector not finite")
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


class AbortSpec(NamedTuple):
    """`abort_when`: stop the request when feature `index` of `sae` is above (sign 1) / below (-1) threshold
    on the residual that predicts its next token."""

    sae: str
    index: int
    threshold: float
    sign: int

    def fires(self, activation: float) -> bool:
        return activation > self.threshold if self.sign > 0 else activation < self.threshold


class ObserveSpec(NamedTuple):
    """What the workers should read for one request: SAEs, top-K, whether prompt tokens count too, the
    watchlist features of the monitored SAEs, the SAEs whose L0 / reconstruction error feed monitoring, and the
    `abort_when` conditions."""

    cid: str  # correlation id: names the request's side-channel file (32 hex characters)
    saes: list[str]
    top_k: int
    prompt: bool
    watch: list[WatchSpec] = []
    stats: list[str] = []  # monitored SAEs: the worker decodes for the error and L0 histograms only for these
    abort: list[AbortSpec] = []

    def encode(self) -> str:
        payload = [
            self.cid,
            self.saes,
            self.top_k,
            self.prompt,
            [list(w) for w in self.watch],
            self.stats,
            [list(a) for a in self.abort],
        ]
        return signing.sign(json.dumps(payload, separators=(",", ":")))

    @classmethod
    def decode(cls, text: object) -> ObserveSpec:
        """Verify and decode; ValueError for anything we did not write or that is out of range."""
        data = json.loads(signing.verify(text))
        if not isinstance(data, list) or len(data) != 7:
            raise ValueError("observe spec: malformed")
        cid, saes, top_k, prompt, watch, stats, abort = data

        def feature_bound(w: object, extra: int) -> bool:
            return (
                isinstance(w, list)
                and len(w) == 3 + extra
                and isinstance(w[0], str)
                and _is_int(w[1])
                and w[1] >= 0
                and isinstance(w[2], (int, float))
                and math.isfinite(w[2])
                and (not extra or w[3] in (-1, 1))
            )

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
            and all(feature_bound(w, 0) for w in watch)
            and isinstance(stats, list)
            and all(isinstance(s, str) for s in stats)
            and isinstance(abort, list)
            and all(feature_bound(a, 1) for a in abort)
        )
        if not ok:
            raise ValueError("observe spec: field out of range")
        return cls(
            cid, saes, top_k, prompt, [WatchSpec(*w) for w in watch], stats, [AbortSpec(*a) for a in abort]
        )
