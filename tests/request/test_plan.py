"""plan_request, the one planning step of the server, `compare`'s default variant and offline steering_args:
the endpoint's rules, the observation plan, the cost, and that each input is parsed and resolved once.

The catalog is test_service's (SAE "a" at layer 3 with feature 7 labelled "bridge", SAE "b" at layer 5, vector
"v" at layer 5).
"""

import base64

import numpy as np
import pytest

import steer_plugin.request.plan as plan_module
import steer_plugin.request.resolve as resolve_module
import steer_plugin.service as service_module
from steer_plugin.config import parse_config
from steer_plugin.observation import ObservationCost
from steer_plugin.offline import steering_args
from steer_plugin.request.plan import Endpoint, PlannedRequest, plan_request, sample_monitored
from steer_plugin.request.schema import SpecError, parse_spec
from steer_plugin.request.wire import WIRE_KEY, AbortSpec, RequestPlan
from tests.test_service import service

CLAMP = {"features": [{"label": "bridge", "op": "clamp", "value": 3}]}
INSPECT = {"inspect": {"saes": ["b"], "top_k": 4, "features": [{"sae": "a", "index": 2}]}}


def planned(steering: dict, body: dict | None = None, observable: bool = True, **config) -> PlannedRequest:
    svc = service(**config)
    endpoint = Endpoint.of({"prompt": "hi", **(body or {})}, observable)
    return plan_request(parse_spec(steering), svc.catalog, svc.config, endpoint)


def test_the_endpoint_facts_are_read_from_the_body_as_vllm_reads_them():
    body = {
        "n": "2",
        "prompt": ["a", "b", "c"],
        "max_tokens": 7.0,
        "ignore_eos": True,
        "response_format": {"type": "json_object"},
    }
    assert Endpoint.of(body) == Endpoint(True, 2, 3, 7, False, True, 0, "response_format")
    # max_completion_tokens wins; a malformed limit is left for vLLM's own validation (0 here)
    assert Endpoint.of({"max_completion_tokens": 5, "max_tokens": 9, "min_tokens": "x"}).max_tokens == 5
    assert Endpoint.of({"min_tokens": "x"}).min_tokens == 0
    assert Endpoint.of({"response_format": {"type": "text"}}).structured_output is None
    with pytest.raises(SpecError) as err:
        Endpoint.of({"n": "two"})
    assert err.value.path == "n"


def test_a_plan_observes_what_inspect_traces_and_abort_when_ask_and_costs_it():
    p = planned({**INSPECT, "abort_when": [{"sae": "a", "index": 7, "above": 2.5}]}, {"max_tokens": 10})
    assert p.inspected == ("b",) and p.traced == (("a", 2),)
    assert p.abort == (AbortSpec("a", 7, 2.5, 1),)
    assert p.observe.saes == ("b", "a") and p.observe.top_k == 4 and not p.observe.prompt
    # written out: 10 generated tokens x 1 choice, 2 SAEs encoded, 4 top-K values x 1 SAE + 1 traced feature
    assert p.cost == ObservationCost(0, 10, 2, 5)
    assert p.ops == () and p.monitored == ()


@pytest.mark.parametrize(
    "steering, body, observable, path",
    [
        (INSPECT, {}, False, "steering.inspect"),
        ({**CLAMP, "compare": True}, {}, False, "steering.compare"),
        ({"compare": True}, {}, True, "steering.compare"),
        (INSPECT, {"n": 2}, True, "steering.inspect"),
        ({"abort_when": [{"sae": "a", "index": 7, "above": 1}]}, {"min_tokens": 2}, True, "min_tokens"),
        (
            {"abort_when": [{"sae": "a", "index": 7, "above": 1}]},
            {"guided_json": {"type": "object"}},
            True,
            "guided_json",
        ),
        (CLAMP, {"use_beam_search": True}, True, "use_beam_search"),
    ],
)
def test_the_endpoints_rules_name_the_field(steering, body, observable, path):
    with pytest.raises(SpecError) as err:
        planned(steering, body, observable)
    assert err.value.path == path


def test_monitoring_samples_only_single_observable_requests():
    svc = service(monitoring={"saes": {"b": {"sample_rate": 1.0}}})
    assert sample_monitored(svc.config, Endpoint.of({"prompt": "hi"})) == ("b",)
    assert sample_monitored(svc.config, Endpoint.of({"prompt": "hi", "n": 2})) == ()
    assert sample_monitored(svc.config, Endpoint.of({"prompt": "hi"}, observable=False)) == ()
    assert sample_monitored(svc.config, Endpoint.of({"prompt": "hi"}), draw=lambda: 0.999) == ("b",)
    half = service(monitoring={"saes": {"b": {"sample_rate": 0.5}}}).config
    assert sample_monitored(half, Endpoint.of({"prompt": "hi"}), draw=lambda: 0.6) == ()


def test_compares_default_variant_keeps_the_observation_and_drops_the_operations():
    svc = service()
    body = {
        "model": "m",
        "prompt": "hi",
        "vllm_xargs": {"other": 1},
        "steering": {**CLAMP, **INSPECT, "compare": True},
    }
    steered = svc.rewrite_request(body, request_id="req-1")
    default = svc.default_variant(steered, "req-2")
    assert steered.ops and default.ops == () and not default.compare
    assert default.inspected == steered.inspected and default.traced == steered.traced
    observe, steered_observe = default.observe, steered.observe
    assert observe._replace(cid="") == steered_observe._replace(cid="") and observe.cid != steered_observe.cid
    # its own signed plan, bound to its own id; the steered body is untouched
    wire = default.body["vllm_xargs"][WIRE_KEY]
    assert RequestPlan.decode(wire) == default.plan and default.plan.binding.matches("req-2")
    assert default.body["vllm_xargs"]["other"] == 1 and wire != steered.body["vllm_xargs"][WIRE_KEY]
    assert (
        steered.plan.binding.matches("req-1") and RequestPlan.decode(steered.body["vllm_xargs"][WIRE_KEY]).ops
    )
    assert default.body["return_token_ids"] is True and not default.user_wants_token_ids


def test_a_compare_request_is_parsed_resolved_and_its_inline_vector_decoded_once(monkeypatch):
    calls = {"parse": 0, "resolve": 0, "inline": 0}

    def counting(module, name: str, key: str):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(service_module, "parse_spec", "parse")
    counting(plan_module, "resolve_spec", "resolve")
    counting(resolve_module, "inline_vector", "inline")
    svc = service(policy={"allow_inline_vectors": True})
    inline = {"base64": base64.b64encode(np.ones(4, "<f4").tobytes()).decode(), "layer": 5}
    body = {"prompt": "hi", "steering": {**CLAMP, **INSPECT, "vectors": [inline], "compare": True}}
    steered = svc.rewrite_request(body, request_id="r")
    svc.default_variant(steered, "r2")
    assert calls == {"parse": 1, "resolve": 1, "inline": 1}
    assert [op.kind for op in steered.ops] == ["feature", "inline"]


def test_offline_and_server_plan_the_same_operations():
    svc = service()
    steering = {
        "features": [{"sae": "b", "index": 2, "op": "scale", "value": 0.25}],
        "vectors": [{"name": "v", "scale": 2}],
    }
    server = svc.rewrite_request({"prompt": "hi", "steering": steering})
    offline = RequestPlan.decode(steering_args(svc.assets, steering)[WIRE_KEY])
    assert offline.ops == server.ops


@pytest.mark.parametrize(
    "layers, num_layers, reserved",
    [("any", 4, (0, 1, 2, 3)), ("any", None, ()), ([5, 2], 4, (2, 5)), ([1], None, (1,))],
)
def test_the_reserved_layer_rule(layers, num_layers, reserved, tmp_path):
    runtime = parse_config(
        {"runtime": {"layers": layers, "rows_per_layer": 8, "roots": [str(tmp_path)]}}
    ).runtime
    assert runtime.reserved_layers(num_layers) == reserved
    assert [layer for layer in range(6) if runtime.reserves(layer)] == (
        list(range(6)) if layers == "any" else sorted(layers)
    )


def test_inspect_probes_are_observed_by_name_and_unknown_ones_refused():
    from steer_plugin.probes.format import ProbeMeta

    svc = service()
    catalog = svc.catalog._replace(
        probes={"mood": ProbeMeta(3, ("happy",)), "topic": ProbeMeta(7, ("a", "b"))}
    )
    endpoint = Endpoint.of({"prompt": "hi", "max_tokens": 10}, True)

    def plan(inspect: dict) -> PlannedRequest:
        return plan_request(parse_spec({"inspect": inspect}), catalog, svc.config, endpoint)

    p = plan({"saes": [], "probes": ["topic", "mood", "topic"]})
    assert p.probes == ("topic", "mood") and p.observe.probes == ("topic", "mood") and p.observe.saes == ()
    # written out: 10 generated tokens, 2 layers read (7 and 3), 2 probe values per token
    assert p.cost == ObservationCost(0, 10, 2, 2)
    assert plan({"probes": ["mood"]}).observe.saes == ("a", "b")  # saes unset: every readable SAE, as before
    for inspect, param in (
        ({"probes": ["mood", "nope"]}, "steering.inspect.probes[1]"),
        ({"saes": []}, "steering.inspect.saes"),
        ({"probes": "mood"}, "steering.inspect.probes"),
        ({"probes": ["p"] * 17}, "steering.inspect.probes"),
    ):
        with pytest.raises(SpecError) as err:
            plan(inspect)
        assert (err.value.path, err.value.status) == (param, 400), inspect


def test_abort_when_on_a_probe_and_monitored_probes():
    from steer_plugin.probes.format import ProbeMeta
    from steer_plugin.request.plan import sample_monitored_probes
    from steer_plugin.request.wire import ProbeAbortSpec

    svc = service(
        probes=[{"id": "mood", "path": "/unused/mood"}, {"id": "topic", "path": "/unused/topic"}],
        monitoring={"probes": {"topic": {"sample_rate": 0.5, "above": 0.8}}},
    )
    catalog = svc.catalog._replace(
        probes={"mood": ProbeMeta(3, ("happy", "sad")), "topic": ProbeMeta(7, ("a",))}
    )
    endpoint = Endpoint.of({"prompt": "hi", "max_tokens": 10}, True)
    assert sample_monitored_probes(svc.config, endpoint, draw=lambda: 0.4) == ("topic",)
    assert sample_monitored_probes(svc.config, endpoint, draw=lambda: 0.6) == ()
    assert sample_monitored_probes(svc.config, Endpoint.of({"prompt": "hi", "n": 2}, True), lambda: 0.0) == ()

    def plan(steering: dict, monitored_probes=()) -> PlannedRequest:
        return plan_request(parse_spec(steering), catalog, svc.config, endpoint, (), monitored_probes)

    p = plan({"abort_when": [{"probe": "mood", "label": "sad", "above": 0.9}]}, ("topic",))
    assert p.probe_abort == (ProbeAbortSpec("mood", 1, 0.9, 1),) and p.abort == ()
    # scored: the abort's probe (the client's, costed) and the monitored one (the operator's, not costed)
    assert p.observe.probes == ("mood", "topic") and p.observe.probe_abort == p.probe_abort
    assert p.probes == () and p.monitored_probes == ("topic",)
    assert p.cost == ObservationCost(0, 10, 1, 0)
    assert plan({"abort_when": [{"probe": "mood", "below": 0.1}]}).probe_abort == (
        ProbeAbortSpec("mood", 0, 0.1, -1),
    )
    windowed = plan({"abort_when": [{"probe": "mood", "label": "sad", "above": 0.5, "window": 8}]})
    assert windowed.probe_abort == (ProbeAbortSpec("mood", 1, 0.5, 1, 8),)
    for condition, param in (
        ({"sae": "a", "index": 1, "above": 1, "window": 4}, "steering.abort_when[0]"),  # probes only
        ({"probe": "mood", "above": 1, "window": 0}, "steering.abort_when[0].window"),
        ({"probe": "mood", "above": 1, "window": 257}, "steering.abort_when[0].window"),
        ({"probe": "mood", "above": 1, "window": 2.5}, "steering.abort_when[0].window"),
        ({"probe": "nope", "above": 1}, "steering.abort_when[0].probe"),
        ({"probe": "mood", "label": "angry", "above": 1}, "steering.abort_when[0].label"),
        ({"probe": "mood", "sae": "a", "above": 1}, "steering.abort_when[0]"),
        ({"probe": "mood"}, "steering.abort_when[0]"),
    ):
        with pytest.raises(SpecError) as err:
            plan({"abort_when": [condition]})
        assert err.value.path == param, condition


def test_the_operators_abort_rule_joins_the_plan_where_the_request_can_stop():
    from steer_plugin.probes.format import ProbeMeta
    from steer_plugin.request.wire import ProbeAbortSpec

    svc = service(
        probes=[{"id": "mood", "path": "/unused/mood"}],
        monitoring={"probes": {"mood": {"label": "sad", "abort_above": 0.95}}},
    )
    catalog = svc.catalog._replace(probes={"mood": ProbeMeta(3, ("happy", "sad"))})

    def plan(body: dict, steering: dict | None = None) -> PlannedRequest:
        endpoint = Endpoint.of({"prompt": "hi", "max_tokens": 5, **body}, True)
        return plan_request(parse_spec(steering or {}), catalog, svc.config, endpoint, (), ("mood",))

    p = plan({})
    assert p.probe_abort == (ProbeAbortSpec("mood", 1, 0.95, 1),) and p.observe.probe_abort == p.probe_abort
    assert p.cost is None  # the operator's, not the client's
    both = plan({}, {"abort_when": [{"probe": "mood", "label": "happy", "below": 0.1}]}).probe_abort
    assert both == (ProbeAbortSpec("mood", 0, 0.1, -1), ProbeAbortSpec("mood", 1, 0.95, 1))
    for unstoppable in (
        {"ignore_eos": True},
        {"min_tokens": 2},
        {"response_format": {"type": "json_object"}},
    ):
        assert plan(unstoppable).probe_abort == (), unstoppable  # served, monitored, never cut
