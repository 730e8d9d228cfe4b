"""SteeringService, framework-free: what rewrite_request puts into the body vLLM sees, the errors it raises (the
field named, the status), the observation it asks for, and how Observation reads the workers' records back.

The catalog is small and in memory: SAE "a" (layer 3, 10 features, feature 7 labelled "bridge"), SAE "b"
(layer 5, 6 features) and vector "v" (layer 5), d_model 4.
"""

import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch

from steer_plugin.catalog import LoadedAssets, LoadedSAE, LoadedVector
from steer_plugin.config import parse_config
from steer_plugin.monitor import transport
from steer_plugin.probes.format import ProbeMeta
from steer_plugin.request.ops import Coefficients, PositionRule, ResolvedOp
from steer_plugin.request.records import ProbeBlock, TokenRecord
from steer_plugin.request.schema import SpecError
from steer_plugin.request.wire import TRACE_THRESHOLD, WIRE_KEY, AbortSpec, RequestPlan, WatchSpec
from steer_plugin.sae.model import SparseAutoencoder
from steer_plugin.service import SteeringService

D = 4


def sae(d_sae: int) -> SparseAutoencoder:
    return SparseAutoencoder(
        W_enc=torch.zeros(D, d_sae),
        W_dec=torch.ones(d_sae, D),
        b_enc=torch.zeros(d_sae),
        b_dec=torch.zeros(D),
    )


def service(**config) -> SteeringService:
    cfg = parse_config(
        {
            "saes": [{"id": "a", "path": "/unused/a"}, {"id": "b", "path": "/unused/b"}],
            "vectors": [{"id": "v", "path": "/unused/v.safetensors", "layer": 5}],
            **config,
        }
    )
    assets = LoadedAssets(
        saes={
            "a": LoadedSAE("a", sae(10), 3, {7: "bridge"}, None),
            "b": LoadedSAE("b", sae(6), 5, {}, None),
        },
        vectors={"v": LoadedVector("v", torch.ones(D), 5)},
        config=cfg,
    )
    return SteeringService(cfg, assets)


def rewrite(body: dict, observable: bool = True, **config):
    return service(**config).rewrite_request({"model": "m", "prompt": "hi", **body}, observable)


def test_steering_becomes_one_signed_plan_in_vllm_xargs():
    steering = {
        "features": [
            {"label": "bridge", "op": "clamp", "value": 3, "positions": "generation"},
            {"sae": "b", "index": 2, "op": "scale", "value": 0.25, "positions": {"last_prompt_tokens": 2}},
        ],
        "vectors": [{"name": "v", "scale": 2}],
    }
    request = rewrite({"steering": steering, "vllm_xargs": {"other": 1}})
    # Written out from the coefficient table (x += (a·f + b)·d): clamp a=-1, b=v; scale a=v-1, b=0;
    # vector a=0, b=scale. Positions: all 0, prompt 1, generation 2, last_prompt_tokens 3.
    assert request.ops == (
        ResolvedOp(
            kind="feature",
            op="clamp",
            layer=3,
            coef=Coefficients(a=-1.0, b=3.0),
            source="a",
            index=7,
            positions=PositionRule(code=2),
        ),
        ResolvedOp(
            kind="feature",
            op="scale",
            layer=5,
            coef=Coefficients(a=-0.75, b=0.0),
            source="b",
            index=2,
            positions=PositionRule(code=3, last_n=2),
        ),
        ResolvedOp(kind="vector", op="vector", layer=5, coef=Coefficients(a=0.0, b=2.0), source="v"),
    )
    body = request.body
    assert "steering" not in body and set(body["vllm_xargs"]) == {"other", WIRE_KEY}
    assert RequestPlan.decode(body["vllm_xargs"][WIRE_KEY]) == request.plan
    assert request.observe is None and request.plan.salt is not None
    assert "return_token_ids" not in body


def test_no_steering_leaves_the_body_alone():
    request = rewrite({"vllm_xargs": {"other": 1}})
    assert request.ops == () and request.observe is None
    assert request.body == {"model": "m", "prompt": "hi", "vllm_xargs": {"other": 1}}


@pytest.mark.parametrize(
    ("body", "path", "status"),
    [
        (
            {"steering": {"features": [{"sae": "zz", "index": 1, "value": 1}]}},
            "steering.features[0].sae",
            400,
        ),
        (
            {"steering": {"features": [{"sae": "a", "index": 10, "value": 1}]}},
            "steering.features[0].index",
            400,
        ),
        ({"steering": {"vectors": [{"name": "v", "scale": "x"}]}}, "steering.vectors[0].scale", 400),
        ({"vllm_xargs": {WIRE_KEY: "forged"}}, f"vllm_xargs.{WIRE_KEY}", 400),
        ({"vllm_xargs": {"steer_plugin_observe": "forged"}}, "vllm_xargs.steer_plugin_observe", 400),
        ({"vllm_xargs": [1]}, "vllm_xargs", 400),
        ({"n": 2, "steering": {"inspect": {}}}, "steering.inspect", 400),
        ({"prompt": ["a", "b"], "steering": {"inspect": {}}}, "steering.inspect", 400),
        ({"steering": {"inspect": {"saes": ["a", "zz"]}}}, "steering.inspect.saes[1]", 400),
        (
            {"use_beam_search": True, "steering": {"features": [{"sae": "a", "index": 1, "value": 1}]}},
            "use_beam_search",
            400,
        ),
        ({"steering": {"compare": True}}, "steering.compare", 400),  # nothing to compare with
        (
            {"ignore_eos": True, "steering": {"abort_when": [{"sae": "a", "index": 1, "above": 1}]}},
            "ignore_eos",
            400,
        ),
        (
            {"n": 3, "steering": {"abort_when": [{"sae": "a", "index": 1, "above": 1}]}},
            "steering.abort_when",
            400,
        ),
        (
            {"steering": {"inspect": {"features": [{"sae": "b", "index": 6}]}}},
            "steering.inspect.features[0].index",
            400,
        ),
    ],
)
def test_errors_name_the_field(body, path, status):
    with pytest.raises(SpecError) as err:
        rewrite(body)
    assert (err.value.path, err.value.status) == (path, status)


def test_policy_and_endpoint_refusals():
    steering = {"features": [{"sae": "a", "index": 1, "value": 1}]}
    with pytest.raises(SpecError) as err:
        rewrite({"steering": steering}, policy={"denied_saes": ["a"]})
    assert (err.value.path, err.value.status) == ("steering.features[0]", 403)
    with pytest.raises(SpecError) as err:  # read-only policy applies to what inspect reads too
        rewrite(
            {"steering": {"inspect": {"features": [{"sae": "a", "index": 7}]}}}, policy={"denied_saes": ["a"]}
        )
    assert (err.value.path, err.value.status) == ("steering.inspect.features[0]", 403)
    with pytest.raises(SpecError) as err:  # a denied SAE's labels are not looked up at all
        rewrite({"steering": {"inspect": {"features": [{"label": "bridge"}]}}}, policy={"denied_saes": ["a"]})
    assert (err.value.path, err.value.status) == ("steering.inspect.features[0].label", 400)
    for field in ({"inspect": {}}, {"abort_when": [{"sae": "a", "index": 1, "above": 1}]}):
        with pytest.raises(SpecError) as err:  # /v1/responses, /v1/messages: no per-token slots
            rewrite({"steering": field}, observable=False)
        assert err.value.path.startswith(f"steering.{next(iter(field))}")
    assert rewrite({"steering": steering}, observable=False).ops  # steering itself applies there


def test_inspect_asks_the_workers_for_what_the_response_reports():
    inspect = {
        "top_k": 3,
        "saes": ["a"],
        "prompt": True,
        "features": [{"label": "bridge"}, {"sae": "b", "index": 2}],
    }
    request = rewrite({"steering": {"inspect": inspect}})
    observe = request.observe
    assert len(observe.cid) == 32 and int(observe.cid, 16) >= 0
    # The inspected SAE, then the traced features' SAEs; traced features are watched on every token.
    assert (observe.saes, observe.top_k, observe.prompt) == (("a", "b"), 3, True)
    assert observe.watch == (WatchSpec("a", 7, TRACE_THRESHOLD), WatchSpec("b", 2, TRACE_THRESHOLD))
    assert (observe.stats, observe.abort) == ((), ())
    assert request.traced == (("a", 7), ("b", 2))
    assert request.plan.salt is None  # nothing steered: its KV is plain
    assert request.body["return_token_ids"] is True and not request.user_wants_token_ids
    assert RequestPlan.decode(request.body["vllm_xargs"][WIRE_KEY]).observe == observe


def test_monitoring_and_abort_when_build_the_observation():
    monitoring = {
        "saes": {"b": {"sample_rate": 1.0}},
        "watchlist": [{"sae": "b", "index": 2, "threshold": 0.5}],
    }
    abort = [{"sae": "a", "index": 7, "above": 2.5}, {"sae": "b", "index": 1, "below": -1}]
    request = rewrite({"steering": {"abort_when": abort}}, monitoring={**monitoring, "top_k": 4})
    observe = request.observe
    assert request.monitored == ("b",)
    assert request.abort == (AbortSpec("a", 7, 2.5, 1), AbortSpec("b", 1, -1.0, -1))
    assert observe.abort == request.abort and observe.stats == ("b",) and observe.top_k == 4
    assert set(observe.saes) == {"a", "b"} and observe.watch == (WatchSpec("b", 2, 0.5),)
    # Monitoring samples single-choice requests only: n = 2 is not monitored (and so not observed at all).
    assert rewrite({"n": 2}, monitoring=monitoring).observe is None


def test_observation_reads_the_workers_records():
    """What the worker sends (TokenRecords) comes back per token: position P-1+k predicts generated token k; a
    read whose record never came is None, not an empty read; the mailbox closes with the response."""
    svc = service()
    inspect = {"top_k": 2, "saes": ["a"], "prompt": True, "features": [{"sae": "b", "index": 2}]}
    abort = [{"sae": "a", "index": 7, "above": 5}]
    request = svc.rewrite_request({"prompt": "hi", "steering": {"inspect": inspect, "abort_when": abort}})
    observation = svc.observation(request)
    cid = request.observe.cid
    prompt_len = 3
    assert request.observe.reply_to == observation.inbox.address  # the records come to this process
    transport.post(
        request.observe.to,
        [
            TokenRecord(0, prompt_len, "a", ((1, 9.0),), sink=True),
            TokenRecord(1, prompt_len, "a", ((4, 2.0),)),
            TokenRecord(2, prompt_len, "a", ((7, 3.0), (4, 1.0), (5, 0.5))),  # predicts generated token 0
            TokenRecord(2, prompt_len, "b", (), watch=((2, 0.0),)),
            TokenRecord(3, prompt_len, "a", ((7, 6.0),), abort=(7, 6.0)),  # would have predicted token 1
        ],
    )
    transport.flush()
    box = observation.inbox.boxes[cid]
    deadline = time.monotonic() + 30
    while not box and time.monotonic() < deadline:  # (sent through a real socket)
        observation.inbox.wait(0.01)
    asyncio.run(observation.settle(3))  # (as the response's path does before each event's reads)
    first, second, third = observation.next_tokens(3)
    assert first.features == {
        "a": [
            {"index": 7, "activation": 3.0, "label": "bridge"},
            {"index": 4, "activation": 1.0, "label": None},
        ]
    }
    assert first.traced == [0.0] and second.traced == [None]  # no record of b at position 3
    assert second.features["a"][0]["index"] == 7 and third.features == {"a": None}  # nothing at position 4
    assert [t.features["a"][0]["index"] for t in observation.prompt_tokens()] == [1, 4, 7]
    assert observation.sinks == {0}
    assert observation.abort() == {
        "sae": "a",
        "index": 7,
        "label": "bridge",
        "activation": 6.0,
        "above": 5.0,
        "token": 1,
    }
    observation.finish("resp-1", "m")
    assert cid not in observation.inbox.boxes  # the mailbox is gone with the response


def settle_beside_a_ticker(observation, generated: int, last: bool = False) -> int:
    """`observation.settle` on an event loop beside a task that ticks every millisecond: the ticks that ran
    while it waited (a wait that blocked the loop would let none run: every stream of a server shares it)."""

    async def run() -> int:
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)  # (the ticker starts)
        await observation.settle(generated, last=last)
        ticker.cancel()
        return ticks

    return asyncio.run(run())


def test_an_abort_whose_record_comes_after_the_forced_end_is_still_reported():
    """The worker sends a step's records before its token is sampled, but they travel apart from the token: an
    answer's end waits (within the response's budget, without holding up the event loop) for its last token's
    abort reads, so a late abort record is reported as the abort, not as a plain stop; a plain stop whose reads
    are here does not wait, and one whose reads never come waits no longer than the budget."""
    svc = service()
    abort = [{"sae": "a", "index": 7, "above": 5}]

    def observed():
        request = svc.rewrite_request({"prompt": "hi", "steering": {"abort_when": abort}})
        observation = svc.observation(request)
        return request, observation

    def send_later(request, records, delay_s):
        def send():
            time.sleep(delay_s)
            transport.post(request.observe.to, records)
            transport.flush()

        sender = threading.Thread(target=send)
        sender.start()
        return sender

    prompt_len = 3  # generated token k is predicted at position 2 + k
    request, observation = observed()
    observation.wait_left = 5.0  # (a budget no loaded machine runs out of: the record comes after ~20 ms)
    sender = send_later(
        request,
        [
            TokenRecord(2, prompt_len, "a", ()),
            TokenRecord(3, prompt_len, "a", ((7, 6.0),), abort=(7, 6.0)),  # forced token 1, the answer's last
        ],
        0.02,
    )
    assert settle_beside_a_ticker(observation, 2, last=True) >= 2  # ~20 ms of waiting, the loop ran on
    assert observation.abort()["token"] == 1
    sender.join()
    observation.finish("resp-1", "m")

    request, observation = observed()
    observation.wait_left = 5.0
    transport.post(
        request.observe.to, [TokenRecord(2, prompt_len, "a", ()), TokenRecord(3, prompt_len, "a", ())]
    )
    transport.flush()
    deadline = time.monotonic() + 30
    while not observation.inbox.boxes[request.observe.cid] and time.monotonic() < deadline:
        observation.inbox.wait(0.01)
    start = time.monotonic()
    asyncio.run(observation.settle(2, last=True))
    assert observation.abort() is None
    assert time.monotonic() - start < 1.0  # its last read was here: no wait for the budget
    observation.finish("resp-2", "m")

    request, observation = observed()  # (the response's budget as served: 50 ms)
    start = time.monotonic()
    asyncio.run(observation.settle(2, last=True))
    assert observation.abort() is None  # nothing ever came
    assert time.monotonic() - start < 1.0
    observation.finish("resp-3", "m")


def test_the_monitoring_line_waits_for_the_last_tokens_reads(tmp_path):
    """The monitoring line is written when the response ends, which can come before the workers' records of its
    last token: it counts them once they arrive (within the response's budget)."""
    log = tmp_path / "monitor.jsonl"
    monitoring = {"saes": {"b": {"sample_rate": 1.0}}, "sink": "file", "path": str(log)}
    svc = service(monitoring=monitoring)
    request = svc.rewrite_request({"prompt": "hi"})
    observation = svc.observation(request)
    observation.wait_left = 5.0  # (a budget no loaded machine runs out of: the record comes after ~20 ms)
    transport.post(request.observe.to, [TokenRecord(2, 3, "b", ((1, 1.0),))])  # token 0
    transport.flush()

    def late():  # token 1, the answer's last
        time.sleep(0.02)
        transport.post(request.observe.to, [TokenRecord(3, 3, "b", ((1, 2.0),))])
        transport.flush()

    sender = threading.Thread(target=late)
    sender.start()
    asyncio.run(observation.settle(2, last=True))  # (as the response's end does)
    observation.finish("resp-1", "m")
    sender.join()
    line = json.loads(log.read_text().splitlines()[-1])
    assert (line["sae"], line["num_tokens"]) == ("b", 2)


def test_probe_scores_come_back_per_token_by_label():
    """A probe block's columns come back per token as {probe: {label: score}} in the request's order, and a
    probe whose scores never came as None (two probes at layer 3: "one" with one label, "two" with two)."""
    config = {
        "saes": [{"id": "a", "path": "/unused/a"}],
        "probes": [{"id": "one", "path": "/unused/one"}, {"id": "two", "path": "/unused/two"}],
    }
    cfg = parse_config(config)
    assets = LoadedAssets(
        saes={"a": LoadedSAE("a", sae(10), 3, {}, None)},
        vectors={},
        config=cfg,
        probes={"one": ProbeMeta(3, ("on",)), "two": ProbeMeta(3, ("x", "y"))},
    )
    svc = SteeringService(cfg, assets)
    request = svc.rewrite_request(
        {"prompt": "hi", "steering": {"inspect": {"saes": [], "probes": ["two", "one"]}}}
    )
    observation = svc.observation(request)
    to = request.observe.to
    for position, layout, row in (
        (2, (("one", 0, 1), ("two", 1, 3)), [0.5, 0.25, 0.75]),
        (3, (("one", 0, 1),), [0.125, 0.0, 0.0]),  # "two" not scored at position 3
    ):
        scores = np.array([row], dtype="<f4").tobytes()
        step = ProbeBlock((bytes.fromhex(to.cid),), (1,), (position,), (3,), (0,), (layout,), 3, scores)
        transport.post_block(to.address, step)
        transport.flush()
    asyncio.run(observation.settle(2))  # (waits for what it expects: both probes at positions 2, 3)
    first, second = observation.next_tokens(2)
    assert list(first.probes) == ["two", "one"]
    assert first.probes == {"two": {"x": 0.25, "y": 0.75}, "one": {"on": 0.5}}
    assert second.probes == {"two": None, "one": {"on": 0.125}}
    observation.finish("resp-1", "m")


DENY_A = {"denied_saes": ["a"]}


def test_inspect_without_saes_reads_only_what_the_policy_allows():
    request = rewrite({"steering": {"inspect": {"top_k": 2}}}, policy=DENY_A)
    assert request.inspected == ("b",) and request.observe.saes == ("b",)
    request = rewrite({"steering": {"inspect": {}}}, policy={"allowed_saes": ["a"]})
    assert request.inspected == ("a",)
    with pytest.raises(SpecError) as err:
        rewrite({"steering": {"inspect": {}}}, policy={"denied_saes": ["a", "b"]})
    assert (err.value.path, err.value.status) == ("steering.inspect", 403)


@pytest.mark.parametrize(
    "steering, path",
    [
        (  # a condition reads the denied SAE's feature on every token
            {"vectors": [{"name": "v", "when": {"sae": "a", "index": 1, "above": 0}}]},
            "steering.vectors[0].when",
        ),
        (
            {
                "features": [
                    {"sae": "b", "index": 1, "value": 1, "when": {"sae": "a", "index": 1, "above": 0}}
                ]
            },
            "steering.features[0].when",
        ),
        ({"abort_when": [{"sae": "a", "index": 1, "above": 0}]}, "steering.abort_when[0]"),
        ({"inspect": {"features": [{"sae": "a", "index": 7}]}}, "steering.inspect.features[0]"),
        ({"inspect": {"saes": ["a"]}}, "steering.inspect.saes[0]"),
    ],
)
def test_every_read_of_a_denied_sae_is_refused(steering, path):
    with pytest.raises(SpecError) as err:
        rewrite({"steering": steering}, policy=DENY_A)
    assert (err.value.path, err.value.status) == (path, 403)


def test_discovery_hides_denied_saes():
    svc = service(policy=DENY_A)
    assert [s["id"] for s in svc.discovery.list_saes()["data"]] == ["b"]
    assert all(hit["sae"] != "a" for hit in svc.discovery.search_features(None, "")["data"])
    assert svc.discovery.search_features(None, "bridge")["total"] == 0
    for sae_id, index in (("a", None), ("a", 7)):
        with pytest.raises(SpecError) as err:
            svc.discovery.search_features(sae_id, None, index=index)
        assert (err.value.path, err.value.status) == ("sae", 403)
    with pytest.raises(SpecError) as err:  # an unknown SAE's error does not list the denied one
        svc.rewrite_request(
            {"prompt": "x", "steering": {"features": [{"sae": "zz", "index": 1, "value": 1}]}}
        )
    assert "'a'" not in err.value.message


def test_counts_are_checked_before_anything_is_decoded(monkeypatch):
    import steer_plugin.service as service_module

    decoded = []
    monkeypatch.setattr(service_module, "parse_spec", lambda *a: decoded.append(1))
    many = {"vectors": [{"values": [0.0] * D, "layer": 5}] * 20_000}
    with pytest.raises(SpecError) as err:
        rewrite({"steering": many}, policy={"allow_inline_vectors": True})
    assert (err.value.path, err.value.status) == ("steering", 400) and "20000" in err.value.message
    with pytest.raises(SpecError) as err:
        rewrite({"steering": {"vectors": [{"values": [0.0] * D, "layer": 5}]}})
    assert (err.value.path, err.value.status) == ("steering.vectors[0]", 403)
    assert decoded == []


@pytest.mark.parametrize("text", ["m/3-res/\u00b2", "m/3-res/\u0663", "m/3-res/\uff13", "m/3-res/3\u00b2"])
def test_feature_ids_take_ascii_digits_only(text):
    svc = service(
        saes=[{"id": "a", "path": "/unused/a", "neuronpedia_id": "m/3-res"}, {"id": "b", "path": "/u/b"}]
    )
    svc.catalog = svc.catalog._replace(
        saes={
            k: v._replace(neuronpedia_id="m/3-res" if k == "a" else None) for k, v in svc.catalog.saes.items()
        }
    )
    with pytest.raises(SpecError) as err:
        svc.rewrite_request({"prompt": "x", "steering": {"features": [{"id": text, "value": 1}]}})
    assert (err.value.path, err.value.status) == ("steering.features[0].id", 400)
    assert svc.rewrite_request(
        {"prompt": "x", "steering": {"features": [{"id": "m/3-res/3", "value": 1}]}}
    ).ops
