"""One steering operation as it is resolved, signed and decoded: `ResolvedOp` and its parts.

An op travels inside the signed plan (wire.py) as an object of its fields, by name (`ResolvedOp.to_wire`);
`checked_op` decodes one, every field's type and range checked, and refuses a bad one naming the field
(`ops[1].when.sign`). The checks here are shared with the rest of the plan's decoding.

Every operation becomes x' = x + c·d at its layer, with d the feature's decoder row (or the vector) and
    c = a·f_i(x) + b            (+ bn·|x|/|d| for normalised adds)
    add: a=0, b=v    clamp: a=-1, b=v    scale: a=v-1, b=0    ablate: a=-1, b=0    vector: a=0, b=scale
(`Coefficients.of_feature_op` and `Coefficients.of_vector` write this table.)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Literal

import numpy as np

POSITION_CODES = {"all": 0, "prompt": 1, "generation": 2, "last_prompt_tokens": 3}
OP_KINDS = ("feature", "vector", "inline")  # ResolvedOp.kind
OP_NAMES = ("add", "clamp", "scale", "ablate", "vector")  # ResolvedOp.op
MAX_REVISION_CHARS = 64  # a load revision (runtime loads) is never longer
MAX_WIRE_INT = 2**31 - 1  # indices, layers and token counts
MAX_WIRE_NUMBER = float(np.finfo(np.float32).max)  # coefficients and thresholds (NaN fails `<=`)


@dataclass(frozen=True, kw_only=True)
class Coefficients:
    """c = a·f_i(x) + b (+ bn·|x|/|d| for normalised adds): each op's values are in the module docstring."""

    a: float
    b: float
    bn: float = 0.0

    @classmethod
    def of_feature_op(cls, op: str, value: float | None, normalize: bool) -> Coefficients:
        if op == "add":
            return cls(a=0.0, b=0.0, bn=value) if normalize else cls(a=0.0, b=value)
        if op == "clamp":
            return cls(a=-1.0, b=value)
        if op == "scale":
            return cls(a=value - 1.0, b=0.0)
        return cls(a=-1.0, b=0.0)  # ablate

    @classmethod
    def of_vector(cls, scale: float, normalize: bool) -> Coefficients:
        return cls(a=0.0, b=0.0, bn=scale) if normalize else cls(a=0.0, b=scale)


@dataclass(frozen=True, kw_only=True)
class PositionRule:
    """Which token positions an op changes: `code` is a POSITION_CODES value, `last_n` the N of
    last_prompt_tokens."""

    code: int = POSITION_CODES["all"]
    last_n: int = 0

    def describe(self) -> str | dict:
        """The rule as a request writes it (what a response reports)."""
        name = next(name for name, code in POSITION_CODES.items() if code == self.code)
        return {"last_prompt_tokens": self.last_n} if name == "last_prompt_tokens" else name

    def first_position(self, num_prompt_tokens: int) -> int:
        """The first token position the rule covers."""
        if self.code == POSITION_CODES["generation"]:
            return num_prompt_tokens
        if self.code == POSITION_CODES["last_prompt_tokens"]:
            return max(0, num_prompt_tokens - self.last_n)
        return 0


@dataclass(frozen=True, kw_only=True)
class When:
    """`when`: the op applies only where feature `index` of SAE `sae` (read at the op's layer) is above
    (`sign` 1) or below (-1) `threshold`."""

    sae: str
    index: int
    sign: Literal[-1, 1]
    threshold: float
    revision: str = ""  # the SAE's load revision (runtime loads; see ResolvedOp.revision)


@dataclass(frozen=True)
class InlineVector:
    """A vector the request carries: `base64` (little-endian float32, d_model values) is what travels and what
    two vectors are compared by; `values` (decoded once per process) and `norm` (its length) never travel."""

    base64: str
    values: np.ndarray = field(compare=False, repr=False)
    norm: float = field(compare=False)

    @classmethod
    def of(cls, values: np.ndarray) -> InlineVector:
        values = np.array(values, dtype=np.float32)  # a copy: the caller's array may change
        return cls(_encode_vector(values), values, _norm(values))

    @classmethod
    def decode(cls, text: str) -> InlineVector:
        """The vector of a wire message's text (kept as it came: the salt is computed from it)."""
        values = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4").astype(np.float32)
        return cls(text, values, _norm(values))


def _encode_vector(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode()


def _norm(values: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.linalg.norm(values.astype(np.float64)))


@dataclass(frozen=True, kw_only=True)
class ResolvedOp:
    """One operation, ready for the workers: x' = x + c·d at `layer`, with d the decoder row of feature
    `index` of SAE `source` (kind "feature"), vector `source` (kind "vector") or the vector the request
    carries (kind "inline"), and c from `coef`, at the positions of `positions`, where `when` (None: always)
    holds. Built by keyword only; on the wire by field name (`to_wire`, `checked_op`)."""

    kind: Literal["feature", "vector", "inline"]  # OP_KINDS
    op: str  # OP_NAMES: add, clamp, scale, ablate or vector (for metrics and the response)
    layer: int
    coef: Coefficients
    source: str = ""  # SAE id or vector id ("" for an inline vector)
    index: int = 0  # feature index (0 for vectors)
    positions: PositionRule = PositionRule()
    when: When | None = None
    inline: InlineVector | None = None  # kind "inline" only
    # Runtime-loaded sources: the load's revision, so a request never reads rows of an SAE or vector that was
    # unloaded (and maybe reloaded under the same id) after it was resolved, and prefix-cache salts differ.
    revision: str = ""

    def to_wire(self) -> dict:
        """The op as it is signed and salted: every field by its name, the parts as objects of their
        fields, an inline vector as its base64 text."""
        return _to_wire(self)


def _to_wire(value: object) -> object:
    if isinstance(value, InlineVector):
        return value.base64
    if is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in fields(value)}
    return value


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_count(v: object) -> bool:
    """An index, a layer or a token count: an integer in [0, MAX_WIRE_INT], far above any real one (an
    unbounded one could overflow the workers' int64 tables)."""
    return is_int(v) and 0 <= v <= MAX_WIRE_INT


def is_number(v: object) -> bool:
    """A number the workers can hold in float32 (a larger int or float would overflow to inf there)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_WIRE_NUMBER


def object_of(cls: type, item: object, where: str) -> dict:
    """A wire object that encodes a `cls`: exactly its fields, by name."""
    names = [f.name for f in fields(cls)]
    if not isinstance(item, dict) or set(item) != set(names):
        raise ValueError(f"steering wire: {where} must be an object of the fields {', '.join(names)}")
    return item


def require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"steering wire: {where} out of range (must be {what})")


def is_revision(v: object) -> bool:
    return isinstance(v, str) and len(v) <= MAX_REVISION_CHARS


def checked_op(item: object, where: str = "op") -> ResolvedOp:
    """One decoded op, every field's type and range checked, by name (defence in depth behind the signature);
    ValueError naming the first bad field. An inline vector is decoded here, once per process."""
    raw = object_of(ResolvedOp, item, where)
    kind, source, index, layer = raw["kind"], raw["source"], raw["index"], raw["layer"]
    require(isinstance(kind, str) and kind in OP_KINDS, f"{where}.kind", f"one of {OP_KINDS}")
    require(
        isinstance(raw["op"], str)
        and raw["op"] in OP_NAMES
        and (raw["op"] == "vector") == (kind != "feature"),
        f"{where}.op",
        f"one of {OP_NAMES}: vector exactly on vector and inline ops",
    )
    require(
        isinstance(source, str) and (kind != "inline" or source == ""),
        f"{where}.source",
        "a string, empty for an inline vector",
    )
    require(is_count(index), f"{where}.index", f"an integer in [0, {MAX_WIRE_INT}]")
    require(is_count(layer), f"{where}.layer", f"an integer in [0, {MAX_WIRE_INT}]")
    require(
        (raw["inline"] is not None) == (kind == "inline"),
        f"{where}.inline",
        "a vector on an inline op and null on any other",
    )
    require(is_revision(raw["revision"]), f"{where}.revision", f"a string of <= {MAX_REVISION_CHARS} chars")
    return ResolvedOp(
        kind=kind,
        op=raw["op"],
        layer=layer,
        coef=_checked_coefficients(raw["coef"], f"{where}.coef"),
        source=source,
        index=index,
        positions=_checked_positions(raw["positions"], f"{where}.positions"),
        when=None if raw["when"] is None else _checked_when(raw["when"], f"{where}.when"),
        inline=None if raw["inline"] is None else _checked_inline(raw["inline"], f"{where}.inline"),
        revision=raw["revision"],
    )


def _checked_coefficients(item: object, where: str) -> Coefficients:
    raw = object_of(Coefficients, item, where)
    for name, value in raw.items():
        require(is_number(value), f"{where}.{name}", "a finite float32 number")
    return Coefficients(**raw)


def _checked_positions(item: object, where: str) -> PositionRule:
    raw = object_of(PositionRule, item, where)
    codes = sorted(POSITION_CODES.values())
    require(is_int(raw["code"]) and raw["code"] in codes, f"{where}.code", f"one of {codes}")
    require(is_count(raw["last_n"]), f"{where}.last_n", f"an integer in [0, {MAX_WIRE_INT}]")
    return PositionRule(**raw)


def _checked_when(item: object, where: str) -> When:
    raw = object_of(When, item, where)
    require(isinstance(raw["sae"], str) and raw["sae"] != "", f"{where}.sae", "an SAE id")
    require(is_count(raw["index"]), f"{where}.index", f"an integer in [0, {MAX_WIRE_INT}]")
    require(is_int(raw["sign"]) and raw["sign"] in (-1, 1), f"{where}.sign", "1 (above) or -1 (below)")
    require(is_number(raw["threshold"]), f"{where}.threshold", "a finite float32 number")
    require(is_revision(raw["revision"]), f"{where}.revision", f"a string of <= {MAX_REVISION_CHARS} chars")
    return When(**raw)


def _checked_inline(text: object, where: str) -> InlineVector:
    what = "base64 of little-endian float32 values, finite and not all zero"
    require(isinstance(text, str), where, what)
    try:
        vector = InlineVector.decode(text)
    except ValueError:  # not base64 (binascii.Error), or not a whole number of float32 values
        vector = None
    require(vector is not None and np.isfinite(vector.values).all() and vector.norm > 0, where, what)
    return vector
