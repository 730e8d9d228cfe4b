"""The `steering` schema: JSON paths in errors, resolution, limits and the prefix-cache salt rule."""

import base64
import json

import numpy as np
import pytest

from steer_plugin import signing
from steer_plugin.signing import SignatureError
from steer_plugin.spec import (
    WIRE_VERSION,
    AbortSpec,
    Catalog,
    ObserveSpec,
    SAEInfo,
    SpecError,
    VectorInfo,
    WatchSpec,
    decode_wire,
    encode_wire,
    first_steered_position,
    parse_spec,
    resolve_feature,
    resolve_spec,
    steering_salt,
)

CATALOG = Catalog(
    saes={
        "a": SAEInfo("a", 3, 100, "m/3-res", {7: "bridge", 8: "cat", 9: "cat"}),
        "b": SAEInfo("b", 5, 10, None, {}),
    },
    vectors={"v": VectorInfo("v", 5)},
    max_ops_per_request=4,
    max_ops_per_layer=3,
    max_abs_value=50.0,
    d_model=4,
    layers=(3, 5),
)


@pytest.mark.parametrize(
    ("steering", "path"),
    [
        ({"features": [{"sae": "a", "index": 1, "value": "x"}]}, "steering.features[0].value"),
        ({"features": [{"sae": "a", "index": 1, "value": float("nan")}]}, "steering.features[0].value"),
        ({"features": [{"sae": "a", "index": 1, "value": 1, "bogus": 2}]}, "steering.features[0].bogus"),
        ({"features": [{"sae": "a", "index": -1, "value": 1}]}, "steering.features[0].index"),
        ({"features": [{"sae": "a", "index": 1}]}, "steering.features[0]"),
        (
            {"features": [{"sae": "a", "index": 1, "value": 1, "positions": "middle"}]},
            "steering.features[0].positions",
        ),
        ({"vectors": [{"name": "v", "scale": float("inf")}]}, "steering.vectors[0].scale"),
        ({"inspect": {"top_k": 0}}, "steering.inspect.top_k"),
        ({"inspect": {"features": [{"sae": "a"}]}}, "steering.inspect.features[0]"),
        (
            {"inspect": {"features": [{"sae": "a", "index": 1, "op": "add"}]}},
            "steering.inspect.features[0].op",
        ),
        ({"inspect": {"features": [{"id": "m/3-res/1"}] * 17}}, "steering.inspect.features"),
        ([1, 2], "steering"),
        ({"vectors": [{"name": "v", "values": [1.0]}]}, "steering.vectors[0]"),
        ({"vectors": [{"values": [1.0, 2.0]}]}, "steering.vectors[0]"),  # an inline vector needs its layer
        ({"vectors": [{"name": "v", "layer": 3}]}, "steering.vectors[0]"),
        ({"vectors": [{"values": [1.0, float("nan")], "layer": 3}]}, "steering.vectors[0].values"),
        ({"vectors": [{"values": "1,2", "layer": 3}]}, "steering.vectors[0].values"),
        ({"vectors": [{"base64": "AA==", "layer": 3, "dtype": "int8"}]}, "steering.vectors[0].dtype"),
        (
            {"features": [{"sae": "a", "index": 1, "value": 1, "when": {"sae": "a", "index": 2}}]},
            "steering.features[0].when",
        ),
        (
            {
                "features": [
                    {
                        "sae": "a",
                        "index": 1,
                        "value": 1,
                        "when": {"sae": "a", "index": 2, "above": 1, "below": 2},
                    }
                ]
            },
            "steering.features[0].when",
        ),
        (
            {
                "features": [
                    {
                        "sae": "a",
                        "index": 1,
                        "value": 1,
                        "when": {"sae": "a", "index": 2, "above": float("nan")},
                    }
                ]
            },
            "steering.features[0].when.above",
        ),
        ({"abort_when": [{"sae": "a", "index": 1, "above": 1}] * 9}, "steering.abort_when"),
        ({"abort_when": [{"sae": "a", "index": 1}]}, "steering.abort_when[0]"),
    ],
)
def test_parse_errors_name_the_path(steering, path):
    with pytest.raises(SpecError) as err:
        parse_spec(steering)
    assert err.value.path == path and err.value.status == 400


@pytest.mark.parametrize(
    ("steering", "path"),
    [
        ({"features": [{"sae": "zz", "index": 1, "value": 1}]}, "steering.features[0].sae"),
        ({"features": [{"sae": "a", "index": 100, "value": 1}]}, "steering.features[0].index"),
        ({"features": [{"id": "m/3-res/100", "value": 1}]}, "steering.features[0].id"),
        ({"features": [{"id": "other/3/1", "value": 1}]}, "steering.features[0].id"),
        ({"features": [{"label": "cat", "value": 1}]}, "steering.features[0].label"),
        ({"features": [{"label": "dog", "value": 1}]}, "steering.features[0].label"),
        ({"features": [{"sae": "a", "index": 1, "value": 51}]}, "steering.features[0].value"),
        ({"vectors": [{"name": "w"}]}, "steering.vectors[0].name"),
        ({"features": [{"sae": "a", "index": i, "value": 1} for i in range(4)]}, "steering"),
        (
            {"features": [{"sae": "a", "index": 1, "value": 1}] * 3, "vectors": [{"name": "v"}] * 2},
            "steering",
        ),
        ({"vectors": [{"values": [1.0, 2.0, 3.0], "layer": 3}]}, "steering.vectors[0].values"),  # d_model 4
        ({"vectors": [{"values": [1.0] * 4, "layer": 4}]}, "steering.vectors[0].layer"),  # not steered
        ({"vectors": [{"values": [0.0] * 4, "layer": 3}]}, "steering.vectors[0].values"),
        ({"vectors": [{"base64": "not base64!", "layer": 3}]}, "steering.vectors[0].base64"),
        ({"vectors": [{"base64": "AAAA", "layer": 3}]}, "steering.vectors[0].base64"),  # 3 bytes
        (
            {
                "features": [
                    {"sae": "a", "index": 1, "value": 1, "when": {"sae": "b", "index": 2, "above": 1}}
                ]
            },
            "steering.features[0].when",  # the condition's feature is at another layer
        ),
        (
            {
                "features": [
                    {"sae": "a", "index": 1, "value": 1, "when": {"sae": "zz", "index": 2, "above": 1}}
                ]
            },
            "steering.features[0].when.sae",
        ),
        (
            {"vectors": [{"name": "v", "when": {"sae": "a", "index": 2, "below": 1}}]},
            "steering.vectors[0].when",
        ),
        (
            {
                "features": [
                    {"sae": "a", "index": 1, "value": 1, "when": {"sae": "a", "index": 2, "above": 1e6}}
                ]
            },
            "steering.features[0].when.above",
        ),
    ],
)
def test_resolution_errors_name_the_path(steering, path):
    with pytest.raises(SpecError) as err:
        resolve_spec(parse_spec(steering), CATALOG)
    assert err.value.path == path


def test_resolution_coefficients_and_names():
    spec = parse_spec(
        {
            "features": [
                {"id": "m/3-res/4", "op": "clamp", "value": 6},
                {"label": "bridge", "op": "scale", "value": 3, "positions": {"last_prompt_tokens": 2}},
                {"sae": "a", "index": 1, "op": "ablate", "positions": "generation"},
                {"sae": "a", "index": 2, "op": "add", "value": 0.5, "normalize": True},
            ],
            "vectors": [{"name": "v", "scale": 2.0}],
        }
    )
    ops = resolve_spec(spec, Catalog(CATALOG.saes, CATALOG.vectors, 8, 8, 50.0))
    assert [(o.source, o.index, o.layer, o.a, o.b, o.bn, o.op) for o in ops] == [
        ("a", 4, 3, -1.0, 6.0, 0.0, "clamp"),
        ("a", 7, 3, 2.0, 0.0, 0.0, "scale"),
        ("a", 1, 3, -1.0, 0.0, 0.0, "ablate"),
        ("a", 2, 3, 0.0, 0.0, 0.5, "add"),
        ("v", 0, 5, 0.0, 2.0, 0.0, "vector"),
    ]
    assert ops[1].positions == 3 and ops[1].last_n == 2
    assert decode_wire(encode_wire(ops)) == ops


def test_inline_vectors_decode_from_every_encoding_and_salt_apart():
    values = np.array([0.5, -1.25, 3.0, 2.0], dtype=np.float32)  # exact in bfloat16 and float16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    encodings = [
        {"values": values.tolist()},
        {"base64": base64.b64encode(values.astype("<f4").tobytes()).decode()},
        {"base64": base64.b64encode(values.astype("<f2").tobytes()).decode(), "dtype": "float16"},
        {"base64": base64.b64encode(bf16).decode(), "dtype": "bfloat16"},
    ]
    ops = [
        resolve_spec(parse_spec({"vectors": [{**e, "layer": 5, "scale": 2.0}]}), CATALOG)[0]
        for e in encodings
    ]
    for op in ops:
        assert (op.kind, op.layer, op.b, op.op) == ("inline", 5, 2.0, "vector")
        assert np.frombuffer(base64.b64decode(op.vector), dtype="<f4").tolist() == values.tolist()
        assert decode_wire(encode_wire([op])) == [op]
    other = resolve_spec(parse_spec({"vectors": [{"values": [0.5, -1.25, 3.0, 2.5], "layer": 5}]}), CATALOG)
    assert steering_salt(other) != steering_salt([ops[0]._replace(b=1.0)])


def test_conditions_resolve_to_the_feature_and_bound():
    spec = {
        "features": [
            {"sae": "a", "index": 1, "op": "clamp", "value": 0, "when": {"label": "bridge", "above": 3}}
        ],
        "vectors": [{"name": "v", "when": {"sae": "b", "index": 4, "below": -0.5}}],
    }
    ops = resolve_spec(parse_spec(spec), CATALOG)
    assert [(o.cond_source, o.cond_index, o.cond_sign, o.cond_threshold) for o in ops] == [
        ("a", 7, 1, 3.0),
        ("b", 4, -1, -0.5),
    ]
    assert decode_wire(encode_wire(ops)) == ops
    plain = resolve_spec(
        parse_spec({"features": [{"sae": "a", "index": 1, "op": "clamp", "value": 0}]}), CATALOG
    )
    assert steering_salt(plain) != steering_salt(ops[:1])


def test_first_steered_position_follows_the_position_rule():
    def first(positions, prompt_len=10):
        feature = {"sae": "a", "index": 1, "value": 1, "positions": positions}
        return first_steered_position(resolve_spec(parse_spec({"features": [feature]}), CATALOG), prompt_len)

    assert first("generation") == 10
    assert first("all") == 0 and first("prompt") == 0
    assert first({"last_prompt_tokens": 3}) == 7
    assert first({"last_prompt_tokens": 30}) == 0
    assert first_steered_position([], 10) is None


def test_salt_depends_on_the_steering_only():
    def salt(value, positions="all"):
        feature = {"sae": "a", "index": 1, "value": value, "positions": positions}
        return steering_salt(resolve_spec(parse_spec({"features": [feature]}), CATALOG))

    # Identical steering shares its blocks, however the client spelled it (key order, 1 vs 1.0, a default).
    spelled = {"positions": "all", "op": "add", "value": 1, "index": 1, "sae": "a"}
    assert steering_salt(resolve_spec(parse_spec({"features": [spelled]}), CATALOG)) == salt(1.0)
    assert len({salt(1.0), salt(2.0), salt(1.0, "generation")}) == 3
    assert steering_salt([]) is None


def test_wire_messages_are_signed(monkeypatch):
    ops = resolve_spec(parse_spec({"features": [{"sae": "a", "index": 1, "value": 1}]}), CATALOG)
    wire = encode_wire(ops)
    payload = wire.split(".", 1)[1]
    with pytest.raises(SignatureError):
        decode_wire(payload)  # unsigned: what a client could put in vllm_xargs
    with pytest.raises(SignatureError):
        decode_wire("0" * 32 + "." + payload)
    with pytest.raises(SignatureError):
        decode_wire(wire.replace('"b":', '"b": ').replace("1.0", "9.0"))
    monkeypatch.setenv(signing.KEY_ENV, "another server")
    with pytest.raises(SignatureError):
        decode_wire(wire)


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
    wire = signing.sign(json.dumps({"v": WIRE_VERSION, "ops": [GOOD_OP]}))
    assert decode_wire(wire)[0].index == 1  # the unchanged op is fine: each case fails on its change only
    op = [change.get(i, v) for i, v in enumerate(GOOD_OP)]
    with pytest.raises(ValueError):
        decode_wire(signing.sign(json.dumps({"v": WIRE_VERSION, "ops": [op]})))
    with pytest.raises(ValueError):
        decode_wire(signing.sign(json.dumps({"v": WIRE_VERSION, "ops": [GOOD_OP[:10]]})))


def test_observe_spec_round_trip_and_ranges():
    spec = ObserveSpec("c" * 32, ["a"], 5, True, [WatchSpec("a", 3, 1.5)], [], [AbortSpec("a", 4, 2.0, -1)])
    assert ObserveSpec.decode(spec.encode()) == spec
    for bad in (
        spec._replace(top_k=-1),
        spec._replace(top_k=65),
        spec._replace(cid="../x"),
        spec._replace(abort=[AbortSpec("a", 4, 2.0, 0)]),
        spec._replace(abort=[AbortSpec("a", -4, 2.0, 1)]),
        spec._replace(abort=[AbortSpec("a", 4, float("nan"), 1)]),
    ):
        with pytest.raises(ValueError):
            ObserveSpec.decode(bad.encode())
    with pytest.raises(SignatureError):
        ObserveSpec.decode(json.dumps(list(spec)))


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ({"sae": "a", "index": 99}, ("a", 99)),
        ({"id": "m/3-res/4"}, ("a", 4)),
        ({"label": "bridge"}, ("a", 7)),
    ],
)
def test_inspect_features_resolve_like_steered_features(ref, want):
    spec = parse_spec({"inspect": {"features": [ref]}})
    sae, index = resolve_feature(spec.inspect.features[0], CATALOG, "steering.inspect.features[0]")
    assert (sae.id, index) == want


@pytest.mark.parametrize(
    ("ref", "path"),
    [
        ({"sae": "a", "index": 100}, "p.index"),
        ({"id": "m/3-res/100"}, "p.id"),
        ({"label": "cat"}, "p.label"),  # not unique
        ({"sae": "c", "index": 1}, "p.sae"),
    ],
)
def test_inspect_feature_resolution_errors(ref, path):
    spec = parse_spec({"inspect": {"features": [ref]}})
    with pytest.raises(SpecError) as err:
        resolve_feature(spec.inspect.features[0], CATALOG, "p")
    assert err.value.path == path
