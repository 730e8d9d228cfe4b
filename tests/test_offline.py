"""steering_args: the offline one-liner gives the same signed plan the server would, or the server's error."""

import pytest

from steer_plugin.offline import steering_args
from steer_plugin.request.ops import Coefficients, ResolvedOp
from steer_plugin.request.schema import SpecError
from steer_plugin.request.wire import WIRE_KEY, RequestPlan

from .test_service import service


def test_steering_args_carry_the_resolved_ops():
    assets = service().assets
    args = steering_args(
        assets, {"features": [{"label": "bridge", "op": "ablate"}], "vectors": [{"name": "v"}]}
    )
    assert set(args) == {WIRE_KEY}
    plan = RequestPlan.decode(args[WIRE_KEY])
    # ablate: a = -1, b = 0; a configured vector: a = 0, b = scale (1 by default); positions "all" = 0
    assert plan.ops == (
        ResolvedOp(
            kind="feature", op="ablate", layer=3, coef=Coefficients(a=-1.0, b=0.0), source="a", index=7
        ),
        ResolvedOp(kind="vector", op="vector", layer=5, coef=Coefficients(a=0.0, b=1.0), source="v"),
    )
    assert plan.observe is None and plan.salt is not None
    # What the server puts in vllm_xargs for the same steering, byte for byte.
    served = service().rewrite_request(
        {
            "prompt": "x",
            "steering": {"features": [{"sae": "a", "index": 7, "op": "ablate"}], "vectors": [{"name": "v"}]},
        }
    )
    assert served.body["vllm_xargs"][WIRE_KEY] == args[WIRE_KEY]


def test_nothing_to_steer_is_no_extra_args():
    assets = service().assets
    assert steering_args(assets, None) == {} and steering_args(assets, {}) == {}


@pytest.mark.parametrize(
    ("steering", "path"),
    [
        ({"inspect": {}}, "steering.inspect"),
        ({"abort_when": [{"sae": "a", "index": 1, "above": 1}]}, "steering.abort_when"),
        ({"features": [{"sae": "a", "index": 1, "value": 1}], "compare": True}, "steering.compare"),
        ({"features": [{"sae": "zz", "index": 1, "value": 1}]}, "steering.features[0].sae"),
        (
            {"vectors": [{"values": [1.0] * 4, "layer": 3}]},
            "steering.vectors[0]",
        ),  # policy: no inline vectors
    ],
)
def test_server_only_fields_and_bad_fields_are_refused(steering, path):
    with pytest.raises(SpecError) as err:
        steering_args(service().assets, steering)
    assert err.value.path == path
