"""Resolution of a parsed `steering` field against the catalog (coefficients, names, limits) and the policy."""

import base64

import numpy as np
import pytest

from steer_plugin.config import PolicyConfig
from steer_plugin.request.ops import PositionRule, When
from steer_plugin.request.resolve import Catalog, check_policy, resolve_feature, resolve_spec
from steer_plugin.request.schema import SpecError, parse_spec

from .catalog import CATALOG


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
    assert [(o.source, o.index, o.layer, o.coef.a, o.coef.b, o.coef.bn, o.op) for o in ops] == [
        ("a", 4, 3, -1.0, 6.0, 0.0, "clamp"),
        ("a", 7, 3, 2.0, 0.0, 0.0, "scale"),
        ("a", 1, 3, -1.0, 0.0, 0.0, "ablate"),
        ("a", 2, 3, 0.0, 0.0, 0.5, "add"),
        ("v", 0, 5, 0.0, 2.0, 0.0, "vector"),
    ]
    assert ops[1].positions == PositionRule(code=3, last_n=2)


def test_inline_vectors_decode_from_every_encoding():
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
        assert (op.kind, op.layer, op.coef.b, op.op) == ("inline", 5, 2.0, "vector")
        assert op.inline.values.tolist() == values.tolist()
        assert np.frombuffer(base64.b64decode(op.inline.base64), dtype="<f4").tolist() == values.tolist()


def test_conditions_resolve_to_the_feature_and_bound():
    spec = {
        "features": [
            {"sae": "a", "index": 1, "op": "clamp", "value": 0, "when": {"label": "bridge", "above": 3}}
        ],
        "vectors": [{"name": "v", "when": {"sae": "b", "index": 4, "below": -0.5}}],
    }
    ops = resolve_spec(parse_spec(spec), CATALOG)
    assert [o.when for o in ops] == [
        When(sae="a", index=7, sign=1, threshold=3.0),
        When(sae="b", index=4, sign=-1, threshold=-0.5),
    ]


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


@pytest.mark.parametrize(
    ("policy", "steering", "path", "status"),
    [
        (
            {"denied_saes": ["a"]},
            {"features": [{"sae": "a", "index": 1, "value": 1}]},
            "steering.features[0]",
            403,
        ),
        (
            {"allowed_saes": ["b"]},
            {"features": [{"sae": "b", "index": 1, "value": 1}, {"sae": "a", "index": 1, "value": 1}]},
            "steering.features[1]",
            403,
        ),
        (
            {"denied_features": [{"sae": "a", "index": 7}]},
            {"features": [{"label": "bridge", "value": 1}]},
            "steering.features[0]",
            403,
        ),
        (
            {"allowed_ops": ["add"]},
            {"features": [{"sae": "a", "index": 1, "op": "clamp", "value": 0}]},
            "steering.features[0].op",
            403,
        ),
        (
            {"max_abs_value": 2},
            {"features": [{"sae": "a", "index": 1, "value": -3}]},
            "steering.features[0].value",
            403,
        ),
        ({"max_abs_value": 2}, {"vectors": [{"name": "v", "scale": 2.5}]}, "steering.vectors[0].scale", 403),
        ({"allow_vectors": False}, {"vectors": [{"name": "v"}]}, "steering.vectors[0]", 403),
        (
            {},
            {"vectors": [{"values": [1.0] * 4, "layer": 3}]},
            "steering.vectors[0]",
            403,
        ),  # inline: off by default
        (
            {"allow_inline_vectors": True, "max_inline_norm": 3.9},
            {"vectors": [{"values": [1.0, 1.0, 1.0, 1.0], "layer": 3, "scale": 2.0}]},  # |v|·scale = 2·2 = 4
            "steering.vectors[0].values",
            400,
        ),
        (
            {"max_ops_per_request": 1},
            {"features": [{"sae": "a", "index": i, "value": 1} for i in range(2)]},
            "steering",
            403,
        ),
        ({"allow_inspect": False}, {"inspect": {}}, "steering.inspect", 403),
        ({"denied_saes": ["b"]}, {"inspect": {"saes": ["a", "b"]}}, "steering.inspect.saes[1]", 403),
    ],
)
def test_policy_refusals_name_the_field(policy, steering, path, status):
    spec = parse_spec(steering)
    ops = resolve_spec(spec, CATALOG)
    check_policy(spec, ops, PolicyConfig(allow_inline_vectors=True))  # the same request passes a lax policy
    with pytest.raises(SpecError) as err:
        check_policy(spec, ops, PolicyConfig(**policy))
    assert (err.value.path, err.value.status) == (path, status)


def test_inline_norm_limit_counts_the_scale_and_passes_below_it():
    steering = {"vectors": [{"values": [1.0, 1.0, 1.0, 1.0], "layer": 3, "scale": 2.0}]}  # |v|·scale = 4
    spec = parse_spec(steering)
    check_policy(
        spec, resolve_spec(spec, CATALOG), PolicyConfig(allow_inline_vectors=True, max_inline_norm=4.01)
    )
    # normalize: `scale` is a fraction of |x|, so only |scale| counts (2 > 1.5)
    normalized = parse_spec({"vectors": [{**steering["vectors"][0], "normalize": True}]})
    with pytest.raises(SpecError):
        check_policy(
            normalized,
            resolve_spec(normalized, CATALOG),
            PolicyConfig(allow_inline_vectors=True, max_inline_norm=1.5),
        )
