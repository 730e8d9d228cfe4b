"""What travels from the API process to the engine core and the workers: one signed `RequestPlan` per request.

vLLM carries only flat values in SamplingParams.extra_args, so the plan is one signed JSON string under
`WIRE_KEY`. The engine core decodes it once when the request enters (its prefix-cache salt, whether prompt
tokens are observed); each worker decodes it once per request (its ops, what to observe). `decode` is strict:
the signature first (`steer_plugin.signing`), then every field's type and range, so a message we did not write,
or a bug on the writing side, never reaches the op or the observer. Each op is decoded by request/ops.py
(`checked_op`), which names a bad field (`ops[1].when.sign`).

A plan the API server signs is bound (`Binding`) to its request and to a short window: it names the request id
the middleware gave the request (vLLM's engine request id contains it), a random nonce, an expiry, and how many
engine requests may carry it (n choices, several prompts). The engine core admits it (`Admissions`) only on a
request whose id contains the bound one, before its expiry, and no more times than that: a captured plan cannot
be replayed on another request, nor after the window, nor again on the same one. A plan the engine core does
not admit is replaced by a marker that never verifies, so the workers never see it (they count the marker as a
rejected message); they check the signature and the request id of every plan again. Plans made in-process for vLLM's `LLM` class (steering_args) are unbound: they never leave the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

from steer_plugin import signing
from steer_plugin.request.ops import (
    ResolvedOp,
    checked_op,
    is_count,
    is_int,
    is_number,
    require,
)

logger = logging.getLogger("steer_plugin")

WIRE_KEY = "steer_plugin"
WIRE_VERSION = 10  # 10: a window on probe abort_when; 9: the observation's reply_to (records over ZeroMQ); 8: residual reads (the fit endpoints), abort_when on probes; 7: the observation by field
# name, with probes; 6: ops by field name, in parts (coefficients, position rule, condition, inline vector)
MAX_RESIDUAL_LAYERS = 16
MAX_ADDRESS_CHARS = 256
MAX_ABORT_WINDOW = 256  # tokens a windowed abort_when on a probe averages over (request/schema.py)
# Keys of vllm_xargs a client may not send (the middleware refuses them before anything else).
RESERVED_KEYS = (WIRE_KEY, f"{WIRE_KEY}_observe")  # and the observation key of wire version 3

MAX_WIRE_OPS = 4096
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


class ProbeAbortSpec(NamedTuple):
    """`abort_when` on a probe: stop when the score of its class `column` is above (sign 1) / below (-1)
    threshold on the residual that predicts the request's next token."""

    probe: str
    column: int
    threshold: float
    sign: int
    window: int = (
        1  # > 1: the mean over the last `window` generated tokens' scores is compared, not each score
    )

    def fires(self, score: float) -> bool:
        return score > self.threshold if self.sign > 0 else score < self.threshold


class Addressee(NamedTuple):
    """Where a request's records go: the API process's inbox address and the request's correlation id."""

    address: str  # ipc://@... on one host, tcp://host:port across hosts ("" : nowhere)
    cid: str


class ObservePlan(NamedTuple):
    """What the workers should read for one request: SAEs, top-K, whether prompt tokens count too, the
    watchlist features of the monitored SAEs, the SAEs whose L0 / reconstruction error feed monitoring, and the
    `abort_when` conditions."""

    cid: str  # correlation id: names the request's mailbox in the API process (32 hex characters)
    saes: tuple[str, ...]
    top_k: int
    prompt: bool
    watch: tuple[WatchSpec, ...] = ()
    stats: tuple[
        str, ...
    ] = ()  # monitored SAEs: the worker decodes for the error and L0 histograms only for these
    abort: tuple[AbortSpec, ...] = ()
    probes: tuple[str, ...] = ()  # probes scored on every observed token
    probe_abort: tuple[ProbeAbortSpec, ...] = ()  # abort_when conditions on probes (scored: in `probes`)
    # Layers whose residual rows the workers write back raw (ResidualRecord): only the admin's fit endpoints
    # plan this (steer_plugin/fitting); the public `steering` field cannot ask for it.
    residuals: tuple[int, ...] = ()
    # The inbox of the API process that owns the request (monitor/inbox.py): where its records go.
    reply_to: str = ""

    @property
    def to(self) -> Addressee:
        return Addressee(self.reply_to, self.cid)


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
        if self.observe is not None:  # by field name, like the ops
            observe = self.observe._asdict()
            observe["watch"] = [w._asdict() for w in self.observe.watch]
            observe["abort"] = [a._asdict() for a in self.observe.abort]
            observe["probe_abort"] = [a._asdict() for a in self.observe.probe_abort]
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
        ops = tuple(checked_op(item, f"ops[{i}]") for i, item in enumerate(raw))
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


def _checked_binding(data: object) -> Binding:
    ok = (
        isinstance(data, list)
        and len(data) == 4
        and isinstance(data[0], str)
        and 1 <= len(data[0]) <= 256
        and isinstance(data[1], str)
        and len(data[1]) == _NONCE_CHARS
        and set(data[1]) <= _CID_CHARS
        and is_number(data[2])
        and is_int(data[3])
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


def _named(cls, item: object, where: str) -> dict:
    """A wire object that encodes the NamedTuple `cls`: exactly its fields, by name."""
    if not isinstance(item, dict) or set(item) != set(cls._fields):
        raise ValueError(f"steering wire: {where} must be an object of the fields {', '.join(cls._fields)}")
    return item


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _checked_feature_bound(cls, item: object, where: str):
    """A WatchSpec or AbortSpec, by field name."""
    raw = _named(cls, item, where)
    require(isinstance(raw["sae"], str), f"{where}.sae", "a string")
    require(is_count(raw["index"]), f"{where}.index", "a feature index")
    require(is_number(raw["threshold"]), f"{where}.threshold", "a finite number")
    if cls is AbortSpec:
        require(raw["sign"] in (-1, 1), f"{where}.sign", "-1 or 1")
        require(not isinstance(raw["sign"], bool), f"{where}.sign", "-1 or 1")
    return cls(**raw)


def _checked_observe(data: object) -> ObservePlan:
    """The observation, every field checked by name (ValueError naming the first bad one)."""
    raw = _named(ObservePlan, data, "observe")
    cid, top_k = raw["cid"], raw["top_k"]
    require(isinstance(cid, str) and len(cid) == 32 and set(cid) <= _CID_CHARS, "observe.cid", "32 hex chars")
    require(is_int(top_k) and 1 <= top_k <= MAX_TOP_K, "observe.top_k", f"an integer in [1, {MAX_TOP_K}]")
    require(isinstance(raw["prompt"], bool), "observe.prompt", "a bool")
    for name in ("saes", "stats", "probes"):
        require(_strings(raw[name]), f"observe.{name}", "a list of strings")
    for name in ("watch", "abort", "probe_abort"):
        require(isinstance(raw[name], list), f"observe.{name}", "a list")
    residuals = raw["residuals"]
    require(
        isinstance(residuals, list)
        and len(residuals) <= MAX_RESIDUAL_LAYERS
        and all(is_count(layer) for layer in residuals),
        "observe.residuals",
        f"a list of at most {MAX_RESIDUAL_LAYERS} layer indices",
    )
    reply_to = raw["reply_to"]
    require(
        isinstance(reply_to, str)
        and len(reply_to) <= MAX_ADDRESS_CHARS
        and (reply_to == "" or reply_to.startswith(("ipc://@", "tcp://"))),
        "observe.reply_to",
        f"an ipc://@ or tcp:// address of at most {MAX_ADDRESS_CHARS} characters",
    )
    return ObservePlan(
        reply_to=reply_to,
        cid=cid,
        saes=tuple(raw["saes"]),
        top_k=top_k,
        prompt=raw["prompt"],
        watch=tuple(
            _checked_feature_bound(WatchSpec, w, f"observe.watch[{i}]") for i, w in enumerate(raw["watch"])
        ),
        stats=tuple(raw["stats"]),
        abort=tuple(
            _checked_feature_bound(AbortSpec, a, f"observe.abort[{i}]") for i, a in enumerate(raw["abort"])
        ),
        probes=tuple(raw["probes"]),
        probe_abort=tuple(
            _checked_probe_abort(a, f"observe.probe_abort[{i}]") for i, a in enumerate(raw["probe_abort"])
        ),
        residuals=tuple(residuals),
    )


def _checked_probe_abort(item: object, where: str) -> ProbeAbortSpec:
    raw = _named(ProbeAbortSpec, item, where)
    require(isinstance(raw["probe"], str), f"{where}.probe", "a string")
    require(is_count(raw["column"]), f"{where}.column", "a class index")
    require(is_number(raw["threshold"]), f"{where}.threshold", "a finite number")
    require(raw["sign"] in (-1, 1) and not isinstance(raw["sign"], bool), f"{where}.sign", "-1 or 1")
    window = raw["window"]
    require(
        is_int(window) and 1 <= window <= MAX_ABORT_WINDOW,
        f"{where}.window",
        f"an integer in [1, {MAX_ABORT_WINDOW}]",
    )
    return ProbeAbortSpec(**raw)
