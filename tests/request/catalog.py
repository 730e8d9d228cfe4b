"""A small catalog the request tests resolve against: SAE "a" at layer 3 (100 features, some labels), SAE "b"
at layer 5 (10 features), vector "v" at layer 5; d_model 4."""

from steer_plugin.request.resolve import Catalog, SAEInfo, VectorInfo

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
