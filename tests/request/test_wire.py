"""The wire: one signed RequestPlan per request, decoded strictly; the prefix-cache salt it carries."""

import base64
import json
import re

import numpy as np
import pytest

from steer_plugin import signing
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
    RequestPlan,
    WatchSpec,
    admit_plan,
)
from steer_plugin.signing import SignatureError

from .catalog import CATALOG

OBSERVE = ObservePlan("c" * 32, ("a",), 5, True, (WatchSpec("a", 3, 1.5),), (), (AbortSpec("a", 4, 2.0, -1),))


def plan_of(steering: dict, catalog: Catalog = CATALOG, observe: ObservePlan | None = None) -> RequestPlan:
    return RequestPlan.build(resolve_spec(parse_spec(steering), catalog), observe)


def message(ops: list, observe: list | None = None, salt: object = "auto", **extra) -> str:
    """A signed plan written by hand (not by RequestPlan.encode): what a buggy writer could send."""
    if salt == "auto":
        from steer_plugin.request.wire import steering_salt

        salt = steering_salt(ops)
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
    observed_only = RequestPlan.build([], OBSERVE)
    assert RequestPlan.decode(observed_only.encode()) == observed_only
    assert (
        observed_only.observes_prompt
        and not RequestPlan.build([], OBSERVE._replace(prompt=False)).observes_prompt
    )


def test_salt_is_equal_exactly_when_the_steering_is():
    one = {"sae": "a", "index": 1, "value": 1}

    def salt(feature, catalog=CATALOG):
        return plan_of({"features": [feature]}, catalog).salt

    # Unsteered (nothing, or observation only) computes plain KV: no salt, blocks shared with everyone.
    assert RequestPlan.build([]).salt is None and RequestPlan.build([], OBSERVE).salt is None
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
    ops = [list(op) for op in plan_of({"features": [{"sae": "a", "index": 1, "value": 1}]}).ops]
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


def test_observation_ranges_are_checked():
    good = ["c" * 32, ["a"], 5, True, [["a", 3, 1.5]], [], [["a", 4, 2.0, -1]]]
    assert RequestPlan.decode(message([], good)).observe == OBSERVE
    for index, value in (
        (2, -1),  # top_k
        (2, 65),
        (2, True),
        (0, "../x" + "c" * 28),  # the correlation id names a file
        (0, "c" * 31),
        (3, 1),  # prompt must be a bool
        (6, [["a", 4, 2.0, 0]]),  # abort sign
        (6, [["a", -4, 2.0, 1]]),
        (6, [["a", 4, float("nan"), 1]]),
        (4, [["a", 3]]),
    ):
        bad = list(good)
        bad[index] = value
        with pytest.raises(ValueError):
            RequestPlan.decode(message([], bad))
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


GOOD_OP = ["feature", "a", 1, 3, 0.0, 1.0, 0.0, 0, 0, "add", "", -1, 0, 0.0, "", "", ""]
NAN_VECTOR = base64.b64encode(np.array([1.0, np.nan], dtype="<f4").tobytes()).decode()


@pytest.mark.parametrize(
    "change",
    [
        {2: -1},
        {5: float("nan")},
        {7: 9},
        {9: "selftest"},
        {2: True},
        {12: 2},  # condition sign
        {12: 1},  # a condition without its feature
        {10: "a", 11: 1, 12: 1, 13: float("inf")},
        {0: "inline"},  # an inline op without its vector
        {14: "AAAAAA=="},  # a vector on a configured-vector op
        {0: "inline", 14: NAN_VECTOR},
        {15: 7},  # a revision that is not a string
        {16: "r" * 65},  # a condition revision longer than any we write
    ],
)
def test_signed_but_malformed_ops_are_refused(change):
    assert (
        RequestPlan.decode(message([GOOD_OP])).ops[0].index == 1
    )  # the unchanged op is fine: each case fails on its change only
    op = [change.get(i, v) for i, v in enumerate(GOOD_OP)]
    with pytest.raises(ValueError):
        RequestPlan.decode(message([op]))
    with pytest.raises(ValueError):
        RequestPlan.decode(message([GOOD_OP[:10]]))


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
