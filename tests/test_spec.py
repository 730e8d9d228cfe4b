"""The `steering` schema: JSON paths in errors, resolution, limits and the prefix-cache salt rule."""

import pytest

from steer_plugin.spec import (
    Catalog,
    SAEInfo,
    SpecError,
    VectorInfo,
    decode_wire,
    encode_wire,
    parse_spec,
    resolve_spec,
    steering_salt,
)

CATALOG = Catalog(
    saes={"a": SAEInfo("a", 3, 100, "m/3-res", {7: "bridge", 8: "cat", 9: "cat"})},
    vectors={"v": VectorInfo("v", 5)},
    max_ops_per_request=4,
    max_ops_per_layer=3,
    max_abs_value=50.0,
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
        ([1, 2], "steering"),
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


def test_salt_only_when_prompt_tokens_are_touched():
    gen = resolve_spec(
        parse_spec({"features": [{"sae": "a", "index": 1, "value": 1, "positions": "generation"}]}), CATALOG
    )
    allpos = resolve_spec(parse_spec({"features": [{"sae": "a", "index": 1, "value": 1}]}), CATALOG)
    other = resolve_spec(parse_spec({"features": [{"sae": "a", "index": 1, "value": 2}]}), CATALOG)
    assert steering_salt(gen) is None
    assert steering_salt(allpos) == steering_salt(allpos) != steering_salt(other)
