"""The `steering` schema: every invalid field is a 400 naming its JSON path."""

import pytest

from steer_plugin.request.schema import SpecError, parse_spec


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
