"""The wire: one signed RequestPlan per request, decoded strictly; the prefix-cache salt it carries."""

import base64
import json
import re

import numpy as np
import pytest

from steer_plugin import signing
from steer_plugin.request.ops import Coefficients, InlineVector, PositionRule, ResolvedOp, When
from steer_plugin.request.resolve import Catalog, SAEInfo, resolve_spec
from steer_plugin.request.schema import parse_spec
from steer_plugin.request.wire import (
    REFUSED,
    WIRE_KEY,
    WIRE_VERSION,
    AbortSpec,
    Admissions,
    Binding,
    ObservePlan,
    ProbeAbortSpec,
    RequestPlan,
    WatchSpec,
    admit_plan,
    wire_salt,
)
from steer_plugin.signing import SignatureError

from .catalog import CATALOG

OBSERVE = ObservePlan("c" * 32, ("a",), 5, True, (WatchSpec("a", 3, 1.5),), (), (AbortSpec("a", 4, 2.0, -1),))


def plan_of(steering: dict, catalog: Catalog = CATALOG, observe: ObservePlan | None = None) -> RequestPlan:
    return RequestPlan.build(resolve_spec(parse_spec(steering), catalog), observe=observe)


def message(ops: list, observe: list | None = None, salt: object = "auto", **extra) -> str:
    """A signed plan written by hand (not by RequestPlan.encode): what a buggy writer could send."""
    if salt == "auto":
        salt = wire_salt(ops)
    return signing.sign(
        json.dumps({"v": WIRE_VERSION, "ops": ops, "observe": observe, "salt": salt, "bind": None, **extra})
    )


def test_plan_round_trips_ops_observation_and_salt():
    values = np.array([0.5, -1.25, 3.0, 2.0], dtype=np.float32)
    steering = {
        "features": [
            {"sae": "a", "index": 1, "op": "clamp", "value": 0, "when": {"label": "bridge", "above": 3}},
            {"sae": "a", "index": 2, "value": 0.5, "normalize": True, "positions": {"last_prompt_tokens": 2}},
        ],
        "vectors": [
            {"name": "v", "when": {"sae": "b", "index": 4, "below": -0.5}},
            {"base64": base64.b64encode(values.astype("<f4").tobytes()).decode(), "layer": 5},
        ],
    }
    plan = plan_of(steering, observe=OBSERVE)
    assert len(plan.ops) == 4 and plan.salt is not None
    assert RequestPlan.decode(plan.encode()) == plan
    observed_only = RequestPlan.build([], observe=OBSERVE)
    assert RequestPlan.decode(observed_only.encode()) == observed_only
    assert (
        observed_only.observes_prompt
        and not RequestPlan.build([], observe=OBSERVE._replace(prompt=False)).observes_prompt
    )


def test_salt_is_equal_exactly_when_the_steering_is():
    one = {"sae": "a", "index": 1, "value": 1}

    def salt(feature, catalog=CATALOG):
        return plan_of({"features": [feature]}, catalog).salt

    # Unsteered (nothing, or observation only) computes plain KV: no salt, blocks shared with everyone.
    assert RequestPlan.build([]).salt is None and RequestPlan.build([], observe=OBSERVE).salt is None
    # The same steering, however the client spelled it and whether it is observed, in a fresh plan and after
    # a round trip, has one salt: its requests share their steered blocks.
    spelled = {"positions": "all", "op": "add", "value": 1.0, "index": 1, "sae": "a"}
    same = {
        salt(one),
        salt(spelled),
        plan_of({"features": [one]}, observe=OBSERVE).salt,
        RequestPlan.decode(plan_of({"features": [one]}).encode()).salt,
    }
    assert len(same) == 1 and re.fullmatch(r"steer-[0-9a-f]{24}", same.pop())
    # Any change to what is computed gives another salt.
    revised = CATALOG._replace(saes={**CATALOG.saes, "a": SAEInfo("a", 3, 100, "m/3-res", {}, "rev2")})
    others = [
        salt(one),
        salt({**one, "value": 2}),
        salt({**one, "index": 2}),
        salt({**one, "positions": "generation"}),
        salt({**one, "op": "clamp"}),
        salt({**one, "when": {"sae": "a", "index": 2, "above": 1}}),
        salt(one, revised),  # the same id after an unload and a reload
        plan_of({"features": [one, {**one, "index": 2}]}).salt,
        plan_of({"vectors": [{"values": [1.0, 2.0, 3.0, 4.0], "layer": 3}]}).salt,
        plan_of({"vectors": [{"values": [1.0, 2.0, 3.0, 4.5], "layer": 3}]}).salt,
    ]
    assert len(set(others)) == len(others)


def test_plan_level_fields_are_checked():
    ops = [op.to_wire() for op in plan_of({"features": [{"sae": "a", "index": 1, "value": 1}]}).ops]
    assert RequestPlan.decode(message(ops)).ops[0].index == 1
    for bad in (
        message(ops, salt="steer-" + "0" * 24),  # a salt that is not the ops'
        message(ops, salt=None),
        message([], salt="steer-" + "0" * 24),
        message(ops, extra=1),
        signing.sign(json.dumps({"v": WIRE_VERSION, "ops": ops})),
        signing.sign(json.dumps({"v": 3, "ops": ops, "observe": None, "salt": None})),
        signing.sign(json.dumps([ops])),
    ):
        with pytest.raises(ValueError):
            RequestPlan.decode(bad)


def test_observation_fields_are_checked_by_name():
    good = {
        "cid": "c" * 32,
        "saes": ["a"],
        "top_k": 5,
        "prompt": True,
        "watch": [{"sae": "a", "index": 3, "threshold": 1.5}],
        "stats": [],
        "abort": [{"sae": "a", "index": 4, "threshold": 2.0, "sign": -1}],
        "probes": ["p"],
        "probe_abort": [{"probe": "p", "column": 1, "threshold": 0.5, "sign": 1, "window": 4}],
        "residuals": [3],
        "reply_to": "tcp://10.0.0.1:5555",
    }
    assert RequestPlan.decode(message([], good)).observe == OBSERVE._replace(
        probes=("p",),
        probe_abort=(ProbeAbortSpec("p", 1, 0.5, 1, 4),),
        residuals=(3,),
        reply_to="tcp://10.0.0.1:5555",
    )
    assert RequestPlan.build([], observe=OBSERVE).encode()  # encodes what decodes
    assert RequestPlan.decode(RequestPlan.build([], observe=OBSERVE).encode()).observe == OBSERVE
    for field, value in (
        ("top_k", -1),
        ("top_k", 65),
        ("top_k", True),
        ("cid", "../x" + "c" * 28),  # the correlation id names a file
        ("cid", "c" * 31),
        ("prompt", 1),  # must be a bool
        ("abort", [{"sae": "a", "index": 4, "threshold": 2.0, "sign": 0}]),
        ("abort", [{"sae": "a", "index": 4, "threshold": 2.0, "sign": True}]),
        ("abort", [{"sae": "a", "index": -4, "threshold": 2.0, "sign": 1}]),
        ("abort", [{"sae": "a", "index": 4, "threshold": float("nan"), "sign": 1}]),
        ("watch", [{"sae": "a", "index": 3}]),
        ("watch", [["a", 3, 1.5]]),  # positional: the wire of version 6
        ("probes", "p"),
        ("probes", [1]),
        ("probe_abort", [{"probe": "p", "column": -1, "threshold": 0.5, "sign": 1, "window": 1}]),
        ("probe_abort", [{"probe": "p", "column": 0, "threshold": float("inf"), "sign": 1, "window": 1}]),
        ("probe_abort", [{"probe": "p", "column": 0, "threshold": 0.5, "sign": 2, "window": 1}]),
        ("probe_abort", [{"probe": 3, "column": 0, "threshold": 0.5, "sign": 1, "window": 1}]),
        ("probe_abort", [{"probe": "p", "column": 0, "threshold": 0.5, "sign": 1, "window": 0}]),
        ("probe_abort", [{"probe": "p", "column": 0, "threshold": 0.5, "sign": 1, "window": 257}]),
        ("probe_abort", [{"probe": "p", "column": 0, "threshold": 0.5, "sign": 1, "window": True}]),
        ("residuals", [-1]),
        ("residuals", ["3"]),
        ("residuals", [True]),
        ("residuals", list(range(17))),
        ("reply_to", "/tmp/somewhere"),  # only the transport's own schemes
        ("reply_to", "ipc:///tmp/a-file"),  # never a path on disk
        ("reply_to", "tcp://" + "h" * 300),
        ("reply_to", None),
    ):
        with pytest.raises(ValueError, match=f"observe.{field}"):
            RequestPlan.decode(message([], {**good, field: value}))
    for missing in good:
        with pytest.raises(ValueError, match="observe must be an object"):
            RequestPlan.decode(message([], {k: v for k, v in good.items() if k != missing}))
    with pytest.raises(SignatureError):
        RequestPlan.decode(json.dumps({"v": WIRE_VERSION, "ops": [], "observe": good, "salt": None}))


def test_first_steered_position_follows_the_position_rule():
    def first(positions, prompt_len=10):
        feature = {"sae": "a", "index": 1, "value": 1, "positions": positions}
        return RequestPlan.build(
            resolve_spec(parse_spec({"features": [feature]}), CATALOG)
        ).first_steered_position(prompt_len)

    assert first("generation") == 10
    assert first("all") == 0 and first("prompt") == 0
    assert first({"last_prompt_tokens": 3}) == 7
    assert first({"last_prompt_tokens": 30}) == 0
    assert RequestPlan.build([]).first_steered_position(10) is None


def test_wire_messages_are_signed(monkeypatch):
    ops = resolve_spec(parse_spec({"features": [{"sae": "a", "index": 1, "value": 1}]}), CATALOG)
    wire = RequestPlan.build(ops).encode()
    payload = wire.split(".", 1)[1]
    with pytest.raises(SignatureError):
        RequestPlan.decode(payload)  # unsigned: what a client could put in vllm_xargs
    with pytest.raises(SignatureError):
        RequestPlan.decode("0" * 32 + "." + payload)
    with pytest.raises(SignatureError):
        RequestPlan.decode(wire.replace('"b":', '"b": ').replace("1.0", "9.0"))
    monkeypatch.setenv(signing.KEY_ENV, "another server")
    with pytest.raises(SignatureError):
        RequestPlan.decode(wire)


GOOD_OP = {
    "kind": "feature",
    "op": "add",
    "layer": 3,
    "coef": {"a": 0.0, "b": 1.0, "bn": 0.0},
    "source": "a",
    "index": 1,
    "positions": {"code": 0, "last_n": 0},
    "when": None,
    "inline": None,
    "revision": "",
}
WHEN = {"sae": "a", "index": 7, "sign": 1, "threshold": 3.0, "revision": ""}
INLINE = {"kind": "inline", "op": "vector", "source": "", "index": 0}


def vector_text(*values: float) -> str:
    return base64.b64encode(np.array(values, dtype="<f4").tobytes()).decode()


def test_ops_travel_by_field_name_and_are_built_by_keyword():
    op = RequestPlan.decode(message([GOOD_OP])).ops[0]
    assert op == ResolvedOp(
        kind="feature", op="add", layer=3, coef=Coefficients(a=0.0, b=1.0), source="a", index=1
    )
    assert op.to_wire() == GOOD_OP  # every field by its name: a renamed field fails here and below
    conditioned = RequestPlan.decode(
        message([{**GOOD_OP, "when": WHEN, "positions": {"code": 3, "last_n": 2}}])
    )
    assert conditioned.ops[0].when == When(sae="a", index=7, sign=1, threshold=3.0)
    assert conditioned.ops[0].positions == PositionRule(code=3, last_n=2)
    inline = (
        RequestPlan.decode(message([{**GOOD_OP, **INLINE, "inline": vector_text(3.0, 4.0)}])).ops[0].inline
    )
    assert inline.values.tolist() == [3.0, 4.0] and inline.norm == 5.0
    assert inline == InlineVector.of(np.array([3.0, 4.0])) and inline.base64 == vector_text(3.0, 4.0)
    with pytest.raises(TypeError):
        ResolvedOp("feature", "add", 3, Coefficients(a=0.0, b=1.0))  # no field is positional


def test_resolved_ops_round_trip_the_wire():
    steering = {
        "features": [
            {"sae": "a", "index": 1, "op": "scale", "value": 2, "positions": {"last_prompt_tokens": 2}},
            {
                "sae": "a",
                "index": 2,
                "value": 0.5,
                "normalize": True,
                "when": {"sae": "a", "index": 7, "below": 1},
            },
        ],
        "vectors": [{"values": [1.0, 2.0, 3.0, 4.0], "layer": 3, "scale": 2.0}],
    }
    ops = plan_of(steering).ops
    assert [o.to_wire()["kind"] for o in ops] == ["feature", "feature", "inline"]
    decoded = RequestPlan.decode(message([o.to_wire() for o in ops])).ops
    assert decoded == ops and decoded[2].inline.values.tolist() == [1.0, 2.0, 3.0, 4.0]


NAN_VECTOR = vector_text(1.0, float("nan"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"index": -1}, ".index"),
        ({"index": True}, ".index"),
        ({"index": 2**63}, ".index"),  # beyond the workers' int64 tables
        ({"positions": {"code": 3, "last_n": 10**400}}, ".positions.last_n"),
        ({"coef": {"a": 0.0, "b": 10**400, "bn": 0.0}}, ".coef.b"),  # not a float at all
        ({"coef": {"a": 0.0, "b": 1e39, "bn": 0.0}}, ".coef.b"),  # inf in float32
        ({"layer": "3"}, ".layer"),
        ({"kind": "other"}, ".kind"),
        ({"op": "selftest"}, ".op"),
        ({"op": "vector"}, ".op"),  # a feature op is add, clamp, scale or ablate
        ({**INLINE, "op": "add", "inline": vector_text(1.0)}, ".op"),
        ({"source": 5}, ".source"),
        ({"coef": {"a": 0.0, "b": float("nan"), "bn": 0.0}}, ".coef.b"),
        ({"coef": {"a": 0.0, "b": 1.0}}, ".coef must be an object of the fields a, b, bn"),
        ({"positions": {"code": 9, "last_n": 0}}, ".positions.code"),
        ({"positions": {"code": 3, "last_n": -1}}, ".positions.last_n"),
        ({"positions": 3}, ".positions must be an object"),
        ({"when": {**WHEN, "sign": 2}}, ".when.sign"),
        ({"when": {**WHEN, "sign": 0}}, ".when.sign"),  # no condition is `when: null`
        ({"when": {**WHEN, "sign": True}}, ".when.sign"),
        ({"when": {**WHEN, "sae": ""}}, ".when.sae"),  # a condition without its feature
        ({"when": {**WHEN, "index": -1}}, ".when.index"),
        ({"when": {**WHEN, "threshold": float("inf")}}, ".when.threshold"),
        ({"when": {**WHEN, "revision": "r" * 65}}, ".when.revision"),  # longer than any we write
        ({"when": {k: v for k, v in WHEN.items() if k != "revision"}}, ".when must be an object"),
        ({**INLINE}, ".inline"),  # an inline op without its vector
        ({**INLINE, "source": "a", "inline": vector_text(1.0)}, ".source"),
        ({"inline": vector_text(1.0)}, ".inline"),  # a vector on a feature op
        ({**INLINE, "inline": NAN_VECTOR}, ".inline"),
        ({**INLINE, "inline": vector_text(0.0, 0.0)}, ".inline"),
        ({**INLINE, "inline": "AAE="}, ".inline"),  # two bytes: not a float32
        ({**INLINE, "inline": "not base64!"}, ".inline"),
        ({**INLINE, "inline": 1.0}, ".inline"),
        ({"revision": 7}, ".revision"),
        ({"revision": "r" * 65}, ".revision"),
        ({"extra": 1}, " must be an object of the fields"),
    ],
)
def test_signed_but_malformed_ops_are_refused_naming_the_field(change, field):
    assert (
        RequestPlan.decode(message([GOOD_OP])).ops[0].index == 1
    )  # the unchanged op is fine: each case fails on its change only
    with pytest.raises(ValueError, match=re.escape(f"ops[1]{field}")):  # the second op is the bad one
        RequestPlan.decode(message([GOOD_OP, {**GOOD_OP, **change}]))


@pytest.mark.parametrize(
    "op",
    [
        {k: v for k, v in GOOD_OP.items() if k != "revision"},  # a field missing
        list(GOOD_OP.values()),  # wire version 5's positional list
        "op",
        None,
    ],
)
def test_ops_that_are_not_objects_of_the_fields_are_refused(op):
    with pytest.raises(ValueError, match=re.escape("ops[0] must be an object of the fields kind, op, layer")):
        RequestPlan.decode(message([op], salt=None))


# --- binding: a plan belongs to its request, a short window and a number of uses ----------------------------


def bound(request_id: str = "chatcmpl-abc", uses: int = 1, ttl: float = 60) -> RequestPlan:
    ops = resolve_spec(parse_spec({"features": [{"sae": "a", "index": 1, "value": 1}]}), CATALOG)
    return RequestPlan.build(ops, binding=Binding.new(request_id, uses, ttl))


def test_a_bound_plan_is_decoded_only_on_its_own_request():
    wire = bound("abc").encode()
    assert RequestPlan.decode(wire, "chatcmpl-abc-1f2e3d4c").binding.request_id == "abc"  # vLLM's id form
    assert RequestPlan.decode(wire, "0_chatcmpl-abc-1f2e3d4c").ops  # a child of n > 1
    with pytest.raises(ValueError, match="another request"):
        RequestPlan.decode(wire, "chatcmpl-xyz-1f2e3d4c")
    salt = RequestPlan.decode(wire).salt
    assert salt == bound("other").salt  # the binding is not part of the prefix-cache salt


def test_the_engine_core_admits_a_plan_once_per_use_and_only_until_it_expires():
    now = [1000.0]
    admissions = Admissions(clock=lambda: now[0])
    plan = bound(uses=2)._replace(binding=bound(uses=2).binding._replace(expires=1060.0))
    admissions.admit(plan)
    admissions.admit(plan)  # n = 2: two engine requests carry it
    with pytest.raises(ValueError, match="replay"):
        admissions.admit(plan)
    late = plan._replace(binding=plan.binding._replace(nonce="f" * 32))
    now[0] = 1061.0
    with pytest.raises(ValueError, match="expired"):
        admissions.admit(late)
    assert not admissions._left  # expired entries are dropped: memory holds one window
    admissions.admit(RequestPlan.build([]))  # unbound (steering_args, in-process): nothing to count


def test_admit_plan_replaces_what_it_refuses_so_workers_never_see_it():
    admissions = Admissions()
    wire = bound("abc").encode()
    args = {WIRE_KEY: wire, "other": 1}
    assert admit_plan(args, "cmpl-abc-12345678", admissions) is not None and args[WIRE_KEY] == wire
    replayed = {WIRE_KEY: wire}  # the same captured plan on another request of the same name
    assert admit_plan(replayed, "cmpl-abc-87654321", admissions) is None and replayed == {WIRE_KEY: REFUSED}
    moved = {WIRE_KEY: bound("abc").encode(), "other": 1}
    assert admit_plan(moved, "cmpl-zzz-12345678", admissions) is None
    assert moved == {WIRE_KEY: REFUSED, "other": 1}
    expired = {WIRE_KEY: bound("abc", ttl=-1).encode()}
    assert admit_plan(expired, "cmpl-abc-1", admissions) is None and expired == {WIRE_KEY: REFUSED}
    with pytest.raises(SignatureError):  # what a worker then sees never verifies (it counts a rejection)
        RequestPlan.decode(REFUSED)


@pytest.mark.parametrize(
    "bind",
    [
        ["", "a" * 32, 1.0, 1],
        ["x" * 257, "a" * 32, 1.0, 1],
        ["id", "A" * 32, 1.0, 1],
        ["id", "a" * 31, 1.0, 1],
        ["id", "a" * 32, float("nan"), 1],
        ["id", "a" * 32, 1.0, 0],
        ["id", "a" * 32, 1.0, True],
        ["id", "a" * 32, 1.0],
        "id",
    ],
)
def test_malformed_bindings_are_refused(bind):
    with pytest.raises(ValueError):
        RequestPlan.decode(message([GOOD_OP], bind=bind))
