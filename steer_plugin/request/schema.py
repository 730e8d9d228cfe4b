"""The HTTP-facing `steering` field of a completion request: its pydantic schema, `parse_spec`, `SpecError`.

Nothing here knows what the server loaded; `steer_plugin.request.resolve` checks a parsed spec against that.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steer_plugin.request.wire import MAX_ABORT_WINDOW

Positions = Literal["all", "prompt", "generation"]


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
        if getattr(self, "probe", None) is not None:
            return self  # a Condition on a probe (checked there)
        if self.id is None and self.label is None and (self.sae is None or self.index is None):
            raise ValueError(
                "name the feature by `sae` + `index`, by `id` (model/source/index) or by `label`"
            )
        if self.id is not None and (self.sae is not None or self.index is not None or self.label is not None):
            raise ValueError("`id` cannot be combined with `sae`, `index` or `label`")
        if self.label is not None and self.index is not None:
            raise ValueError("give `index` or `label`, not both")
        return self


def _finite_number(v: float | None) -> float | None:
    """Field check shared by the models below: pydantic takes NaN and inf from Python callers."""
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


class Condition(FeatureRef):
    """A feature's activation, or a probe's score, compared with a threshold: `above` or `below` (exactly one).
    On a probe: `probe` names it and `label` one of its labels (its first when unset)."""

    probe: str | None = None
    """A probe id (config `probes`): the condition reads its score instead of a feature's activation."""
    above: float | None = None
    """Holds where the feature's activation is > this value."""
    below: float | None = None
    """Holds where the feature's activation is < this value."""
    window: int | None = Field(None, ge=1, le=MAX_ABORT_WINDOW)
    """On a probe only: the condition reads the mean score over the last `window` generated tokens (a full window;
    attention sinks left out) instead of each token's own score: a sustained passage stops the answer, a single
    spiking token does not. Unset or 1: per token."""

    _finite = field_validator("above", "below")(_finite_number)

    @model_validator(mode="after")
    def _one_bound(self) -> Condition:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of `above` or `below`")
        if self.probe is not None and (self.sae is not None or self.index is not None or self.id is not None):
            raise ValueError("a condition on a `probe` names one of its labels with `label`, no feature")
        if self.window is not None and self.probe is None:
            raise ValueError("`window` is for conditions on a `probe`")
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

    _finite = field_validator("value")(_finite_number)

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

    _finite = field_validator("scale")(_finite_number)

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
MAX_PROBES = 16


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
    probes: list[str] = Field(default_factory=list, max_length=MAX_PROBES)
    """Probe ids (config `probes`) scored on every token (`probes`, one score per label), with per-request
    aggregates at the end of each choice (`probe_summary`: max, mean, window_max)."""


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


def json_path(prefix: str, loc: tuple) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("LastPromptTokens", "literal['all','prompt','generation']") or "literal[" in str(part):
            continue
        else:
            path += f".{part}"
    return path


def first_error(err: ValidationError, prefix: str = "") -> SpecError:
    """The SpecError of pydantic's first error: its JSON path after `prefix` (or the `param` a validator put in
    its context), its message. The one conversion of every body the plugin validates with pydantic."""
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    param = (first.get("ctx") or {}).get("param")
    return SpecError(param or json_path(prefix, first["loc"]).lstrip(".") or "body", message)


def parse_spec(data: object, prefix: str = "steering") -> SteeringSpec:
    """Validate the raw `steering` JSON; raises SpecError naming the JSON path of the first bad field."""
    if isinstance(data, SteeringSpec):
        return data
    try:
        return SteeringSpec.model_validate(data)
    except ValidationError as err:
        raise first_error(err, prefix) from None


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
