"""What travels from the API process to the engine core and the workers: one signed `RequestPlan` per request.

vLLM carries only flat values in SamplingParams.extra_args, so the plan is one signed JSON string under
`WIRE_KEY`. The engine core decodes it once when the request enters (its prefix-cache salt, whether prompt
tokens are observed); each worker decodes it once per request (its ops, what to observe). `decode` is strict:
the signature first (`steer_plugin.signing`), then every field's type and range, so a message we did not write,
or a bug on the writing side, never reaches the op or the observer. An op travels as an object of its fields, by
name (`ResolvedOp.to_wire`); a bad one is refused naming the field (`ops[1].when.sign`).

A plan the API server signs is bound (`Binding`) to its request and to a short window: it names the request id
the middleware gave the request (vLLM's engine request id contains it), a random nonce, an expiry, and how many
engine requests may carry it (n choices, several prompts). The engine core admits it (`Admissions`) only on a
request whose id contains the bound one, before its expiry, and no more times than that: a captured plan cannot
be replayed on another request, nor after the window, nor again on the same one. A plan the engine core does
not admit is replaced by a marker that never verifies, so the workers never see it (they count the marker as a
rejected message); they check the signature and the request id of every plan again. Plans made in-process for vLLM's `LLM` class (steering_args) are unbound: they never leave the process.

Every operation becomes x' = x + c·d at its layer, with d the feature's decoder row (or the vector) and
    c = a·f_i(x) + b            (+ bn·|x|/|d| for normalised adds)
    add: a=0, b=v    clamp: a=-1, b=v    scale: a=v-1, b=0    ablate: a=-1, b=0    vector: a=0, b=scale
(`Coefficients.of_feature_op` and `Coefficients.of_vector` write this table.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Literal, NamedTuple

import numpy as np

from steer_plugin import signing

logger = logging.getLogger("steer_plugin")

WIRE_KEY = "steer_plugin"
WIRE_VERSION = 6  # 6: ops by field name, in parts (coefficients, position rule, condition, inline vector)
# Keys of vllm_xargs a client may not send (the middleware refuses them before anything else).
RESERVED_KEYS = (WIRE_KEY, f"{WIRE_KEY}_observe")  # and the observation key of wire version 3

POSITION_CODES = {"all": 0, "prompt": 1, "generation": 2, "last_prompt_tokens": 3}
OP_KINDS = ("feature", "vector", "inline")  # ResolvedOp.kind
OP_NAMES = ("add", "clamp", "scale", "ablate", "vector")  # ResolvedOp.op
MAX_WIRE_OPS = 4096
MAX_TOP_K = 64
MAX_REVISION_CHARS = 64  # a load revision (runtime loads) is never longer
MAX_WIRE_INT = 2**31 - 1  # indices, layers and token counts
MAX_WIRE_NUMBER = float(np.finfo(np.float32).max)  # coefficients and thresholds (NaN fails `<=`)
_CID_CHARS = frozenset("0123456789abcdef")


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
    holds. Built by keyword only; on the wire by field name (`to_wire`, `_checked_op`)."""

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


class ObservePlan(NamedTuple):
    """What the workers should read for one request: SAEs, top-K, whether prompt tokens count too, the
    watchlist features of the monitored SAEs, the SAEs whose L0 / reconstruction error feed monitoring, and the
    `abort_when` conditions."""

    cid: str  # correlation id: names the request's observation channel (32 hex characters)
    saes: tuple[str, ...]
    top_k: int
    prompt: bool
    watch: tuple[WatchSpec, ...] = ()
    stats: tuple[
        str, ...
    ] = ()  # monitored SAEs: the worker decodes for the error and L0 histograms only for these
    abort: tuple[AbortSpec, ...] = ()


PLAN_TTL_S = 120  # a bound plan must reach the engine core within this long after it was signed
MAX_USES = 4096  # engine requests one plan may be admitted on (n x prompts; /v1/responses' turns)
_NONCE_CHARS = 32


class Binding(NamedTuple):
    """What ties a signed plan to its request: see the module docstring."""

    request_id: str  # the id the API server gave the request (vLLM's engine request id contains it)
    nonce: str  # random, one per plan: what Admissions counts
    expires: float  # unix time after which the engine core refuses it
    uses: int  # engine requests that may carry it

    @classmethod
    def new(cls, request_id: str, uses: int = 1, ttl: float = PLAN_TTL_S) -> Binding:
        return cls(request_id, secrets.token_hex(_NONCE_CHARS // 2), round(time.time() + ttl, 3), uses)

    def matches(self, request_id: str) -> bool:
        return self.request_id in request_id


class RequestPlan(NamedTuple):
    """One request's steering and observation, as the engine core and the workers see it."""

    ops: tuple[ResolvedOp, ...]
    observe: ObservePlan | None = None
    salt: str | None = None  # prefix-cache salt of KV computed under `ops` (None: nothing steered)
    binding: Binding | None = None  # None: an in-process plan (steering_args), not bound to a request

    @classmethod
    def build(cls, ops, *, observe: ObservePlan | None = None, binding: Binding | None = None) -> RequestPlan:
        ops = tuple(ops)
        return cls(ops, observe, steering_salt(ops), binding)

    def encode(self) -> str:
        """The signed message (SamplingParams.extra_args[WIRE_KEY])."""
        observe = None
        if self.observe is not None:
            o = self.observe
            observe = [
                o.cid,
                list(o.saes),
                o.top_k,
                o.prompt,
                [list(w) for w in o.watch],
                list(o.stats),
                [list(a) for a in o.abort],
            ]
        payload = {
            "v": WIRE_VERSION,
            "ops": [op.to_wire() for op in self.ops],
            "observe": observe,
            "salt": self.salt,
            "bind": None if self.binding is None else list(self.binding),
        }
        return signing.sign(json.dumps(payload, separators=(",", ":")))

    @classmethod
    def decode(cls, text: object, request_id: str | None = None) -> RequestPlan:
        """Verify and decode; ValueError (SignatureError) for anything we did not write or that is out of range,
        and for a bound plan carried by a request whose id is not `request_id`'s (when given)."""
        data = json.loads(signing.verify(text))
        if not isinstance(data, dict) or data.get("v") != WIRE_VERSION:
            raise ValueError("unsupported steering wire version")
        if set(data) != {"v", "ops", "observe", "salt", "bind"}:
            raise ValueError("steering wire: malformed plan")
        raw = data["ops"]
        if not isinstance(raw, list) or len(raw) > MAX_WIRE_OPS:
            raise ValueError("steering wire: `ops` must be a list")
        ops = tuple(_checked_op(item, f"ops[{i}]") for i, item in enumerate(raw))
        observe = None if data["observe"] is None else _checked_observe(data["observe"])
        if data["salt"] != steering_salt(ops):
            raise ValueError("steering wire: salt does not match the operations")
        binding = None if data["bind"] is None else _checked_binding(data["bind"])
        if binding is not None and request_id is not None and not binding.matches(request_id):
            raise ValueError("steering wire: the plan is bound to another request")
        return cls(ops, observe, data["salt"], binding)

    def first_steered_position(self, num_prompt_tokens: int) -> int | None:
        """The first token position whose residual any op changes. KV of earlier positions is computed exactly
        as without steering (attention is causal), so those blocks may be shared with everyone."""
        return min((op.positions.first_position(num_prompt_tokens) for op in self.ops), default=None)

    @property
    def observes_prompt(self) -> bool:
        """Prompt-token features are reported: every prompt position must be computed (no prefix-cache read)."""
        return self.observe is not None and self.observe.prompt


def steering_salt(ops) -> str | None:
    """Prefix-cache salt of KV computed under these ResolvedOps (None when nothing is steered)."""
    return wire_salt([op.to_wire() for op in ops])


def wire_salt(wire_ops: list) -> str | None:
    """The salt of ops as they travel (`ResolvedOp.to_wire`): the hash of the version and the ops."""
    if not wire_ops:
        return None
    payload = json.dumps({"v": WIRE_VERSION, "ops": wire_ops}, separators=(",", ":"))
    return "steer-" + hashlib.sha256(payload.encode()).hexdigest()[:24]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v: object) -> bool:
    """An index, a layer or a token count: an integer in [0, MAX_WIRE_INT], far above any real one (an
    unbounded one could overflow the workers' int64 tables)."""
    return _is_int(v) and 0 <= v <= MAX_WIRE_INT


def _is_number(v: object) -> bool:
    """A number the workers can hold in float32 (a larger int or float would overflow to inf there)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_WIRE_NUMBER


def _object_of(cls: type, item: object, where: str) -> dict:
    """A wire object that encodes a `cls`: exactly its fields, by name."""
    names = [f.name for f in fields(cls)]
    if not isinstance(item, dict) or set(item) != set(names):
        raise ValueError(f"steering wire: {where} must be an object of the fields {', '.join(names)}")
    return item


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"steering wire: {where} out of range (must be {what})")


def _is_revision(v: object) -> bool:
    return isinstance(v, str) and len(v) <= MAX_REVISION_CHARS


def _checked_op(item: object, where: str = "op") -> ResolvedOp:
    """One decoded op, every field's type and range checked, by name (defence in depth behind the signature);
    ValueError naming the first bad field. An inline vector is decoded here, once per process."""
    raw = _object_of(ResolvedOp, item, where)
    kind, source, index, layer = raw["kind"], raw["source"], raw["index"], raw["layer"]
    _require(isinstance(kind, str) and kind in OP_KINDS, f"{where}.kind", f"one of {OP_KINDS}")
    _require(
        isinstance(raw["op"], str)
        and raw["op"] in OP_NAMES
        and (raw["op"] == "vector") == (kind != "feature"),
        f"{where}.op",
        f"one of {OP_NAMES}: vector exactly on vector and inline ops",
    )
    _require(
        isinstance(source, str) and (kind != "inline" or source == ""),
        f"{where}.source",
        "a string, empty for an inline vector",
    )
    _require(_is_count(index), f"{where}.index", f"an integer in [0, {MAX_WIRE_INT}]")
    _require(_is_count(layer), f"{where}.layer", f"an integer in [0, {MAX_WIRE_INT}]")
    _require(
        (raw["inline"] is not None) == (kind == "inline"),
        f"{where}.inline",
        "a vector on an inline op and null on any other",
    )
    _require(_is_revision(raw["revision"]), f"{where}.revision", f"a string of <= {MAX_REVISION_CHARS} chars")
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
    raw = _object_of(Coefficients, item, where)
    for name, value in raw.items():
        _require(_is_number(value), f"{where}.{name}", "a finite float32 number")
    return Coefficients(**raw)


def _checked_positions(item: object, where: str) -> PositionRule:
    raw = _object_of(PositionRule, item, where)
    codes = sorted(POSITION_CODES.values())
    _require(_is_int(raw["code"]) and raw["code"] in codes, f"{where}.code", f"one of {codes}")
    _require(_is_count(raw["last_n"]), f"{where}.last_n", f"an integer in [0, {MAX_WIRE_INT}]")
    return PositionRule(**raw)


def _checked_when(item: object, where: str) -> When:
    raw = _object_of(When, item, where)
    _require(isinstance(raw["sae"], str) and raw["sae"] != "", f"{where}.sae", "an SAE id")
    _require(_is_count(raw["index"]), f"{where}.index", f"an integer in [0, {MAX_WIRE_INT}]")
    _require(_is_int(raw["sign"]) and raw["sign"] in (-1, 1), f"{where}.sign", "1 (above) or -1 (below)")
    _require(_is_number(raw["threshold"]), f"{where}.threshold", "a finite float32 number")
    _require(_is_revision(raw["revision"]), f"{where}.revision", f"a string of <= {MAX_REVISION_CHARS} chars")
    return When(**raw)


def _checked_inline(text: object, where: str) -> InlineVector:
    what = "base64 of little-endian float32 values, finite and not all zero"
    _require(isinstance(text, str), where, what)
    try:
        vector = InlineVector.decode(text)
    except ValueError:  # not base64 (binascii.Error), or not a whole number of float32 values
        vector = None
    _require(vector is not None and np.isfinite(vector.values).all() and vector.norm > 0, where, what)
    return vector


def _checked_binding(data: object) -> Binding:
    ok = (
        isinstance(data, list)
        and len(data) == 4
        and isinstance(data[0], str)
        and 1 <= len(data[0]) <= 256
        and isinstance(data[1], str)
        and len(data[1]) == _NONCE_CHARS
        and set(data[1]) <= _CID_CHARS
        and _is_number(data[2])
        and _is_int(data[3])
        and 1 <= data[3] <= MAX_USES
    )
    if not ok:
        raise ValueError("steering wire: malformed binding")
    return Binding(*data)


class Admissions:
    """The engine core's record of the bound plans it admitted during this server's life: each nonce is
    admitted on at most `uses` requests and only until it expires (its entry is then dropped, so memory holds
    only the plans of the last PLAN_TTL_S seconds). Thread-safe."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._left: OrderedDict[str, tuple[int, float]] = OrderedDict()  # nonce -> (uses left, expires)
        self._lock = threading.Lock()

    def admit(self, plan: RequestPlan) -> None:
        """Count one use of `plan` (ValueError: expired, or used up: a replay)."""
        binding = plan.binding
        if binding is None:
            return
        now = self._clock()
        with self._lock:
            while self._left and next(iter(self._left.values()))[1] < now:
                self._left.popitem(last=False)  # signed in order, so they expire about in order
            if binding.expires < now:
                raise ValueError("steering wire: the plan has expired")
            left, _ = self._left.get(binding.nonce, (binding.uses, binding.expires))
            if left <= 0:
                raise ValueError("steering wire: the plan was already used (a replay)")
            self._left[binding.nonce] = (left - 1, binding.expires)


ADMISSIONS = Admissions()


REFUSED = "refused by the engine core"  # what replaces a plan the engine core did not admit (never verifies)


def admit_plan(
    extra_args: dict | None, request_id: str, admissions: Admissions = ADMISSIONS
) -> RequestPlan | None:
    """The engine core's gate, once per request as it enters: the request's plan if it is ours, bound to this
    request, fresh and not used up; otherwise None, and the plan is replaced by REFUSED, so no worker ever
    sees it (the workers count REFUSED as a rejected message; the request runs unsteered and unobserved)."""
    wire = (extra_args or {}).get(WIRE_KEY)
    if wire is None:
        return None
    try:
        plan = RequestPlan.decode(wire, request_id)
        admissions.admit(plan)
        return plan
    except Exception as err:
        extra_args[WIRE_KEY] = REFUSED
        logger.warning("steer_plugin: steering of request %s dropped: %s", request_id, err)
        return None


def _checked_observe(data: object) -> ObservePlan:
    if not isinstance(data, list) or len(data) != 7:
        raise ValueError("steering wire: malformed observation")
    cid, saes, top_k, prompt, watch, stats, abort = data

    def feature_bound(w: object, extra: int) -> bool:
        return (
            isinstance(w, list)
            and len(w) == 3 + extra
            and isinstance(w[0], str)
            and _is_count(w[1])
            and _is_number(w[2])
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
        raise ValueError("steering wire: observation field out of range")
    return ObservePlan(
        cid,
        tuple(saes),
        top_k,
        prompt,
        tuple(WatchSpec(*w) for w in watch),
        tuple(stats),
        tuple(AbortSpec(*a) for a in abort),
    )
