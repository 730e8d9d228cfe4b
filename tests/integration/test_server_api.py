"""The OpenAI-compatible server started by `steer-serve`: SDK clients, errors, inspect, metrics, monitoring."""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import openai
import pytest
import requests
import torch

from .conftest import VECTOR_LAYER, add_explanations, running_server, write_monitored_config
from .probe_checks import check_chat_probe_scores, config_entries, make_probes

pytestmark = pytest.mark.server

PORT = 18765 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
WATCHED = 100  # watchlist feature (the tests clamp it so that it fires)
DENIED = 666  # policy-denied feature


@pytest.fixture(scope="module")
def server_config(demo_assets, steer_config_path, sae_layer, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("server")
    path = write_monitored_config(
        steer_config_path,
        folder,
        WATCHED,
        DENIED,
        max_abs_value=500.0,
        allow_inline_vectors=True,
        max_inline_vectors=2,
        max_inline_norm=100.0,
    )
    explained = explained_features(demo_assets.labels_path)
    add_explanations(path, folder, explanations(explained))
    probes = make_probes(folder, sae_layer, sae=("demo", demo_assets.sae_dir))
    config = json.loads(open(path).read())
    config["probes"] = config_entries(probes)
    # Every request's answer scored by "concept"; flagged whenever its max passes 0 (a sigmoid always does).
    config["monitoring"]["probes"] = {"concept": {"sample_rate": 1.0, "aggregate": "max", "above": 0.0}}
    open(path, "w").write(json.dumps(config))
    return {"path": path, "monitor": folder / "monitor.jsonl", "explained": explained, "probes": probes}


def _np_explanation(index: int, description: str, layer: str = "15-res-topk") -> dict:
    """One explanation object of Neuronpedia's bulk export."""
    return {
        "modelId": "smollm2-135m",
        "layer": layer,
        "index": str(index),
        "description": description,
        "explanationModelName": "gpt-4o-mini",
        "typeName": "oai_token-act-pair",
    }


def explained_features(labels_path) -> dict[str, int]:
    """Features of this build to explain, chosen by their recorded max activations (never literal indices: a
    rebuilt SAE numbers its latents differently): `exact` fires least, `word` and `prefix` fire hardest, so an
    exact match must outrank stronger features; `api` is another labelled feature."""
    features = json.loads(open(labels_path).read())["features"]
    maxima = sorted(
        (f["max_act"], int(i))
        for i, f in (features.items() if isinstance(features, dict) else enumerate(features))
        if isinstance(f, dict) and f.get("label") and f.get("max_act")
    )
    return {
        "exact": maxima[0][1],
        "word": maxima[-1][1],
        "prefix": maxima[-2][1],
        "api": maxima[len(maxima) // 2][1],
    }


def explanations(ix: dict[str, int]) -> dict[str, str]:
    """Neuronpedia explanations of the demo SAE (smollm2-135m/15-res-topk): the bulk layout (JSONL) and the API's
    per-feature JSON, in one folder."""
    return {
        "batch-0.jsonl": "\n".join(
            json.dumps(e)
            for e in [
                _np_explanation(ix["exact"], "Golden Gate Bridge"),
                _np_explanation(ix["word"], "the Golden Gate Bridge in San Francisco"),
                _np_explanation(ix["prefix"], "golden gate bridges"),
                _np_explanation(99999, "another source", layer="3-res-topk"),  # skipped
            ]
        ),
        f"feature-{ix['api']}.json": json.dumps(
            {
                "modelId": "smollm2-135m",
                "layer": "15-res-topk",
                "index": str(ix["api"]),
                "maxActApprox": 40.0,
                "explanations": [
                    {
                        "description": "towers and bridges",
                        "explanationModelName": "claude-3-5-haiku",
                        "typeName": "np_max-act",
                    }
                ],
            }
        ),
    }


@pytest.fixture(scope="module")
def server(demo_assets, server_config):
    with running_server(demo_assets.model_dir, server_config["path"], PORT) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="none")


MESSAGES = [{"role": "user", "content": "Describe a famous landmark in one sentence."}]
CLAMP = {"features": [{"sae": "demo", "index": WATCHED, "op": "clamp", "value": 60.0}]}


def metric(name: str, **labels) -> float:
    text = requests.get(f"{BASE}/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            total += float(m.group(2))
    return total


# --- the official OpenAI SDK --------------------------------------------------------------------------------


def test_sdk_chat_non_streaming(client):
    plain = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, temperature=0)
    steered = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"steering": CLAMP}
    )
    choice = steered.choices[0].model_dump()
    assert choice["steering"]["applied"] == [
        {
            "op": "clamp",
            "layer": 15,
            "positions": "all",
            "sae": "demo",
            "index": WATCHED,
            "label": choice["steering"]["applied"][0]["label"],
        }
    ]
    assert steered.choices[0].message.content != plain.choices[0].message.content


def test_sdk_chat_streaming_with_inspect(client):
    stream = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"steering": {**CLAMP, "inspect": {"top_k": 3}}},
    )
    chunks = [c.model_dump() for c in stream]
    tokens = [t for c in chunks for ch in c["choices"] for t in ch.get("steering", {}).get("tokens", [])]
    # One read per generated token (the end-of-sequence one too: the steered answer may end before 8, as it
    # does with the SAE some machines' asset builds train).
    generated = next(c["usage"]["completion_tokens"] for c in chunks if c.get("usage"))
    assert 1 <= generated <= 8 and len(tokens) == generated
    assert chunks[0]["choices"][0]["steering"]["applied"][0]["index"] == WATCHED
    for t in tokens:
        assert 1 <= len(t["demo"]) <= 3
        assert all(f["activation"] > 0 for f in t["demo"])
    # the clamped feature reads ~60 on every generated token (it is in the top k at that value)
    assert all(any(f["index"] == WATCHED for f in t["demo"]) for t in tokens)
    assert "token_ids" not in chunks[1]["choices"][0]


def test_sdk_completions_non_streaming_and_streaming(client):
    kwargs = dict(model="demo", prompt="The weather today is", max_tokens=8, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    steered = client.completions.create(**kwargs, extra_body={"steering": CLAMP}).choices[0]
    assert steered.text != plain
    assert steered.model_dump()["steering"]["applied"][0]["op"] == "clamp"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**kwargs, stream=True, extra_body={"steering": CLAMP})
    )
    assert streamed == steered.text


def test_plain_requests_client_and_vector(server):
    body = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "steering": {"vectors": [{"name": "unit", "scale": 0.8, "normalize": True}]},
    }
    reply = requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["steering"]["applied"] == [
        {"op": "vector", "layer": VECTOR_LAYER, "positions": "all", "vector": "unit"}
    ]


# --- errors ---------------------------------------------------------------------------------------------------

BAD = [
    (
        {"features": [{"sae": "demo", "index": 1, "op": "clamp", "value": "high"}]},
        400,
        "steering.features[0].value",
    ),
    ({"features": [{"sae": "nope", "index": 1, "value": 1.0}]}, 400, "steering.features[0].sae"),
    ({"features": [{"sae": "demo", "index": 10**7, "value": 1.0}]}, 400, "steering.features[0].index"),
    ({"features": [{"id": "smollm2-135m/99-res-x/3", "value": 1.0}]}, 400, "steering.features[0].id"),
    ({"features": [{"label": "no such label anywhere", "value": 1.0}]}, 400, "steering.features[0].label"),
    ({"vectors": [{"name": "missing"}]}, 400, "steering.vectors[0].name"),
    ({"features": [{"sae": "demo", "index": 1, "value": 1e300}]}, 400, "steering.features[0].value"),
    ({"features": [{"sae": "demo", "index": i, "value": 1.0} for i in range(40)]}, 400, "steering"),
    ({"features": [], "colour": "red"}, 400, "steering.colour"),
    ({"features": [{"sae": "demo", "index": 1, "op": "ablate", "value": 2.0}]}, 400, "steering.features[0]"),
    ({"inspect": {"top_k": 1000}}, 400, "steering.inspect.top_k"),
    ({"features": [{"sae": "demo", "index": DENIED, "value": 1.0}]}, 403, "steering.features[0]"),
    ({"features": [{"sae": "demo", "index": 1, "value": 900.0}]}, 403, "steering.features[0].value"),
]


@pytest.mark.parametrize(("steering", "status", "param"), BAD)
def test_bad_steering_is_rejected_and_server_keeps_serving(server, steering, status, param):
    before = metric("steer_rejected_requests_total", reason="policy" if status == 403 else "invalid")
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 4, "steering": steering}
    reply = requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert (
        metric("steer_rejected_requests_total", reason="policy" if status == 403 else "invalid") == before + 1
    )
    ok = requests.post(f"{BASE}/v1/chat/completions", json={**body, "steering": CLAMP}, timeout=120)
    assert ok.status_code == 200


def test_nan_value_is_rejected(server):
    raw = '{"model": "demo", "prompt": "Hi", "max_tokens": 2, "steering": {"features": [{"sae": "demo", "index": 1, "value": NaN}]}}'
    reply = requests.post(
        f"{BASE}/v1/completions", data=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "steering.features[0].value"


# --- discovery and inspect ----------------------------------------------------------------------------------------


def test_admin_routes_do_not_exist_without_runtime_config(server, demo_assets):
    """No `runtime` section (and no admin key): runtime loads are vLLM's unknown routes, whatever the header."""
    headers = {"X-Steer-Admin-Key": "k" * 32}
    load = requests.post(
        f"{BASE}/v1/steering/saes",
        json={"id": "x", "path": str(demo_assets.sae_dir)},
        headers=headers,
        timeout=30,
    )
    unload = requests.delete(f"{BASE}/v1/steering/saes/demo", headers=headers, timeout=30)
    assert load.status_code in (404, 405) and unload.status_code in (404, 405)
    assert "demo" in [s["id"] for s in requests.get(f"{BASE}/v1/steering/saes", timeout=30).json()["data"]]


def test_discovery(server, assets):
    saes = requests.get(f"{BASE}/v1/steering/saes", timeout=10).json()["data"]
    assert [(s["id"], s["layer"], s["d_sae"], s["format"]) for s in saes] == [
        ("demo", 15, assets.saes["demo"].sae.d_sae, "saelens")
    ]
    label = next(iter(assets.saes["demo"].labels.values()))
    hits = requests.get(
        f"{BASE}/v1/steering/features", params={"sae": "demo", "q": label}, timeout=10
    ).json()["data"]
    assert any(h["label"] == label for h in hits)
    assert requests.get(f"{BASE}/v1/steering/features", params={"sae": "nope"}, timeout=10).status_code == 404
    schema = requests.get(f"{BASE}/openapi.json", timeout=30).json()["components"]["schemas"]
    assert schema["ChatCompletionRequest"]["properties"]["steering"]
    assert "FeatureOp" in schema


def test_feature_search_ranks_labels_and_explanations(server, assets, server_config, demo_assets):
    from steer_demo.concept import concept_feature

    ix = server_config["explained"]

    def search(**params):
        reply = requests.get(f"{BASE}/v1/steering/features", params=params, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()

    found = search(sae="demo", q="Golden Gate Bridge")
    assert found["total"] == 3
    assert [(h["index"], h["match"]) for h in found["data"]] == [
        (ix["exact"], "exact"),
        (ix["word"], "word"),
        (ix["prefix"], "prefix"),
    ]
    first = found["data"][0]
    assert min(h["max_activation"] for h in found["data"][1:]) > first["max_activation"]  # match before max
    assert first["matched"] == {"source": "neuronpedia", "text": "Golden Gate Bridge", "model": "gpt-4o-mini"}
    assert first["explanations"] == [
        {
            "description": "Golden Gate Bridge",
            "source": "neuronpedia",
            "model": "gpt-4o-mini",
            "type": "oai_token-act-pair",
        }
    ]
    assert first["label"] == assets.saes["demo"].labels[ix["exact"]]
    # An exact label match ranks first, then whole-word, prefix and substring matches.
    labels = assets.saes["demo"].labels
    concept = concept_feature(demo_assets)
    bridge = search(sae="demo", q=labels[concept.index], limit=50)["data"]
    assert bridge[0]["match"] == "exact" and bridge[0]["matched"]["source"] == "label"
    assert labels[bridge[0]["index"]].lower() == labels[concept.index].lower()
    assert [h["match"] for h in bridge] == sorted(
        (h["match"] for h in bridge), key=["exact", "word", "prefix", "substring"].index
    )
    # One feature by index, with the explanation from the API layout.
    one = search(sae="demo", index=ix["api"])["data"]
    assert one[0]["explanations"] == [
        {
            "description": "towers and bridges",
            "source": "neuronpedia",
            "model": "claude-3-5-haiku",
            "type": "np_max-act",
        }
    ]
    assert one[0]["label"] == labels[ix["api"]]
    saes = requests.get(f"{BASE}/v1/steering/saes", timeout=10).json()["data"]
    assert saes[0]["num_explained"] == 4
    for params, param, status in [
        ({"sae": "demo", "index": "x"}, "index", 400),
        ({"sae": "demo", "index": 4608}, "index", 404),
        ({"index": 1}, "index", 400),
    ]:
        reply = requests.get(f"{BASE}/v1/steering/features", params=params, timeout=10)
        assert (reply.status_code, reply.json()["error"]["param"]) == (status, param), reply.text


def test_inspect_endpoint_matches_reference_encode(server, hf, assets, sae_layer):
    text = "The Golden Gate Bridge spans the strait at the entrance of San Francisco Bay."
    reply = requests.post(f"{BASE}/v1/steering/inspect", json={"text": text, "top_k": 5}, timeout=120)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    ids = [d["token_id"] for d in data]
    assert [d["sink"] for d in data] == [True] + [False] * (len(data) - 1)  # monitoring.sink_positions = 1
    x = hf.residual_after(sae_layer, ids)  # [T, d]
    f = assets.saes["demo"].sae.encode(x)  # [T, d_sae]
    checked = 0
    for pos in range(1, len(ids)):  # position 0 is the attention sink: huge norm, fp32 rounding dominates
        got = {d["index"]: d["activation"] for d in data[pos]["features"]["demo"]}
        values, indices = torch.topk(f[pos], 5)
        want = {int(i): float(v) for i, v in zip(indices, values) if v > 0}
        strongest = max(want, key=want.get)
        assert strongest in got and abs(got[strongest] - want[strongest]) <= 1e-2 * max(1.0, want[strongest])
        for index in set(got) & set(want):
            assert abs(got[index] - want[index]) <= 1e-2 * max(1.0, want[index])
        checked += 1
    assert checked >= 10


def test_inspect_traces_features_on_every_token(server, hf, assets, sae_layer, demo_assets):
    """`features` report a feature's activation on every token, in or out of the top K, as the reference
    encode computes it; chat completions carry the same per generated token."""
    from steer_demo.concept import concept_feature

    concept = concept_feature(demo_assets).index
    text = "The Golden Gate Bridge spans the strait at the entrance of San Francisco Bay."
    traced = [{"sae": "demo", "index": concept}, {"sae": "demo", "index": WATCHED}]
    reply = requests.post(
        f"{BASE}/v1/steering/inspect", json={"text": text, "top_k": 1, "features": traced}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [(f["sae"], f["index"]) for f in body["traced_features"]] == [("demo", concept), ("demo", WATCHED)]
    assert body["traced_features"][0]["label"] == assets.saes["demo"].labels.get(concept)
    data = body["data"]
    x = hf.residual_after(sae_layer, [d["token_id"] for d in data])  # [T, d]
    f = assets.saes["demo"].sae.encode(x)  # [T, d_sae]
    outside_top1 = 0
    for pos in range(1, len(data)):  # position 0: the attention sink (see above)
        assert len(data[pos]["traced"]) == 2
        for got, index in zip(data[pos]["traced"], (concept, WATCHED)):
            want = float(f[pos, index])
            assert abs(got - want) <= 1e-2 * max(1.0, abs(want)), (pos, index, got, want)
        outside_top1 += data[pos]["features"]["demo"][0]["index"] != concept
    assert outside_top1 >= 3  # traced values are not just the top-K list
    assert max(v[0] for v in (d["traced"] for d in data[1:])) > 1.0  # the concept fires on this text

    # Chat completions: one traced value per generated token, beside its top-K features.
    chat = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "max_tokens": 5, "temperature": 0,
              "steering": {"inspect": {"top_k": 2, "features": [{"sae": "demo", "index": concept}]}}},
        timeout=120,
    ).json()["choices"][0]["steering"]  # fmt: skip
    assert len(chat["traced"]) == len(chat["tokens"]) == 5
    assert all(len(v) == 1 and v[0] is not None and v[0] >= 0 for v in chat["traced"])
    for tokens, values in zip(chat["tokens"], chat["traced"]):  # where it is in the top K, the values agree
        for item in tokens["demo"]:
            if item["index"] == concept:
                assert item["activation"] == pytest.approx(values[0], abs=1e-3)


@pytest.mark.parametrize(
    ("traced", "param", "status"),
    [
        ([{"sae": "demo", "index": 10**9}], "steering.inspect.features[0].index", 400),
        ([{"sae": "nope", "index": 1}], "steering.inspect.features[0].sae", 400),
        ([{"sae": "demo"}], "steering.inspect.features[0]", 400),
        ([{"sae": "demo", "index": 1}] * 17, "steering.inspect.features", 400),
        ("demo/1", "steering.inspect.features", 400),
    ],
)
def test_inspect_traced_feature_errors(server, traced, param, status):
    reply = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "max_tokens": 2,
              "steering": {"inspect": {"features": traced}}},
        timeout=60,
    )  # fmt: skip
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    inspect = requests.post(
        f"{BASE}/v1/steering/inspect", json={"text": "hi", "features": traced}, timeout=60
    )
    assert inspect.status_code == status
    assert inspect.json()["error"]["param"] == param


def test_measured_demo_strength_names_the_concept(server, demo_assets):
    """The demo's clamp value, chosen on this server by steer_demo.strength: the steered answer names
    the concept (a whole word, case-insensitive) and the plain one does not; the steered one stays fluent."""
    from steer_demo.concept import concept_feature
    from steer_demo.labels import CONCEPTS
    from steer_demo.strength import MAX_FLUENCY_DROP, choose_strength

    concept = concept_feature(demo_assets)
    max_act = json.loads(open(demo_assets.labels_path).read())["features"][concept.index]["max_act"]
    words = CONCEPTS["bridge"]["word_tokens"]
    question = "What should I see on a weekend trip? Answer in two sentences."  # examples/demo.py's
    choice = choose_strength(BASE, "demo", "demo", concept.index, max_act, question, words)
    assert choice.value is not None, [(a.value, a.text) for a in choice.tried]
    plain, steered = choice.plain.text.lower(), choice.chosen.text.lower()
    assert re.search(r"\bbridges?\b", steered) and not re.search(r"\bbridges?\b", plain), (plain, steered)
    assert choice.chosen.fluency >= choice.plain.fluency - MAX_FLUENCY_DROP
    # Smallest: every smaller value tried failed a criterion.
    assert all(a.value < choice.value for a in choice.tried[:-1]) and choice.tried[-1] is choice.chosen


# --- compare: steered and default in one call ------------------------------------------------------------------


def _chat(body: dict) -> dict:
    reply = requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_compare_returns_steered_and_default_choices(server):
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    both = _chat({**body, "steering": {**CLAMP, "compare": True, "inspect": {"top_k": 2}}})
    alone_steered = _chat({**body, "steering": CLAMP})
    alone_plain = _chat(body)
    steered, default = both["choices"]
    assert (steered["index"], steered["steering"]["variant"]) == (0, "steered")
    assert (default["index"], default["steering"]["variant"]) == (1, "default")
    # Each equals the same request made alone: the default one is an unsteered request.
    assert steered["message"]["content"] == alone_steered["choices"][0]["message"]["content"]
    assert default["message"]["content"] == alone_plain["choices"][0]["message"]["content"]
    assert steered["message"]["content"] != default["message"]["content"]
    assert [a["op"] for a in steered["steering"]["applied"]] == ["clamp"] and default["steering"][
        "applied"
    ] == []
    # Both are inspected as asked; the clamped feature is read on the steered side only.
    # (one read per generated token: a steered answer may end before max_tokens, as it does with some machines'
    # asset builds)
    assert len(steered["steering"]["tokens"]) == alone_steered["usage"]["completion_tokens"] > 0
    assert len(default["steering"]["tokens"]) == alone_plain["usage"]["completion_tokens"] > 0
    top = [t["demo"][0]["index"] for t in steered["steering"]["tokens"]]
    assert top.count(WATCHED) > len(top) // 2 and WATCHED not in [
        t["demo"][0]["index"] for t in default["steering"]["tokens"]
    ]
    usage = both["usage"]
    assert usage["completion_tokens"] == (
        alone_steered["usage"]["completion_tokens"] + alone_plain["usage"]["completion_tokens"]
    )
    assert usage["prompt_tokens"] == 2 * alone_plain["usage"]["prompt_tokens"]


def test_compare_streams_through_the_sdk(client):
    stream = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"steering": {**CLAMP, "compare": True}},
    )  # fmt: skip
    texts, variants, usages, finished = {}, {}, [], {}
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            variants.setdefault(choice.index, set()).add(choice.model_extra["steering"]["variant"])
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert variants == {0: {"steered"}, 1: {"default"}}
    assert set(finished) == {0, 1}
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    alone_steered, alone_plain = _chat({**body, "steering": CLAMP}), _chat(body)
    assert texts[0] == alone_steered["choices"][0]["message"]["content"]
    assert texts[1] == alone_plain["choices"][0]["message"]["content"]
    # both variants' tokens counted once (a steered answer may end before the 12 with some asset builds)
    alone = alone_steered["usage"]["completion_tokens"] + alone_plain["usage"]["completion_tokens"]
    assert len(usages) == 1 and usages[0].completion_tokens == alone


def engine_gauge(name: str) -> float:
    """A vllm: series summed over its labels (engine, model)."""
    text = requests.get(f"{BASE}/metrics", timeout=30).text
    values = [float(m[1]) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} is not exported"
    return sum(values)


def test_compare_stream_dropped_by_the_client_aborts_both(server):
    """(vLLM counts no finished_reason for aborted requests: the running gauge and the generated-token count
    tell that both variants stopped.)"""
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
            "max_tokens": 400, "temperature": 0, "stream": True, "steering": {**CLAMP, "compare": True}}  # fmt: skip
    seen: set[int] = set()
    with requests.post(f"{BASE}/v1/chat/completions", json=body, stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for line in lines:  # until both variants stream
            if line.startswith(b"data: {"):
                seen |= {c["index"] for c in json.loads(line[6:])["choices"]}
            if len(seen) == 2:
                break
        deadline = time.time() + 30
        while engine_gauge("vllm:num_requests_running") < 2:
            assert time.time() < deadline, "the two variants never ran together"
            next(lines)
    # The client has gone: both variants stop (a leaked one would go on to 400 tokens).
    deadline = time.time() + 30
    while engine_gauge("vllm:num_requests_running") > 0:
        assert time.time() < deadline, "a variant kept running after the client left"
        time.sleep(0.5)
    generated = engine_gauge("vllm:generation_tokens_total")
    time.sleep(3)
    assert engine_gauge("vllm:generation_tokens_total") == generated
    assert _chat({"model": "demo", "messages": MESSAGES, "max_tokens": 2})["choices"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "steering": {"compare": True}}, "steering.compare"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "steering": {**CLAMP, "compare": 5}},
            "steering.compare",
        ),
        ("/v1/responses", {"input": "hi", "steering": {**CLAMP, "compare": True}}, "steering.compare"),
    ],
)
def test_compare_errors_name_the_field(path, body, param, server):
    reply = requests.post(f"{BASE}{path}", json={"model": "demo", "max_tokens": 2, **body}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


# --- metrics and monitoring -------------------------------------------------------------------------------------


def test_workers_answer_through_the_plugins_extension(server, client):
    """steer-serve started vLLM with the plugin's worker extension, and the worker figures on /metrics come
    through it (collective_rpc("steer_plugin_stats") on the extension's method)."""
    from steer_adapters.vllm.worker.extension import EXTENSION_PATH

    argv = open(f"/proc/{server.pid}/cmdline", "rb").read().decode().split("\0")
    assert argv[argv.index("--worker-extension-cls") + 1] == EXTENSION_PATH
    before = metric("steer_steered_tokens_total", op="clamp")
    client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=3, temperature=0, extra_body={"steering": CLAMP}
    )
    assert metric("steer_steered_tokens_total", op="clamp") >= before + 3


def test_metrics_move(server, client):
    names = {
        "requests": ("steer_requests_total", {"op": "clamp"}),
        "tokens": ("steer_steered_tokens_total", {"op": "clamp"}),
        "applied": ("steer_features_applied_total", {"sae": "demo"}),
        "watch": ("steer_watchlist_firings_total", {"sae": "demo", "feature": str(WATCHED)}),
        "l0": ("steer_active_features_count", {"sae": "demo"}),
        "err": ("steer_reconstruction_error_count", {"sae": "demo"}),
        "op_time": ("steer_op_seconds_total", {}),
    }
    before = {k: metric(n, **lab) for k, (n, lab) in names.items()}
    client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"steering": CLAMP}
    )
    after = {k: metric(n, **lab) for k, (n, lab) in names.items()}
    assert after["requests"] == before["requests"] + 1
    assert after["tokens"] >= before["tokens"] + 6  # prompt and generated tokens
    assert after["applied"] == before["applied"] + 1
    assert after["watch"] >= before["watch"] + 5
    assert after["l0"] >= before["l0"] + 6 and after["err"] >= before["err"] + 6
    assert after["op_time"] > before["op_time"]
    assert metric("steer_sae_memory_bytes", sae="demo") > 0


def test_monitoring_log_lines(server, client, server_config):
    reply = client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=5, temperature=0, extra_body={"steering": CLAMP}
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = (
            [json.loads(line) for line in server_config["monitor"].read_text().splitlines()]
            if server_config["monitor"].exists()
            else []
        )
        mine = [r for r in lines if r["request_id"] == reply.id and "sae" in r]
        if mine:
            break
        time.sleep(0.2)
    (record,) = mine
    assert set(record) == {
        "ts",
        "request_id",
        "model",
        "sae",
        "num_tokens",
        "sink_tokens",
        "steered",
        "top_features",
        "watchlist",
        "abort",
    }
    assert record["abort"] is None
    assert record["sae"] == "demo" and record["num_tokens"] == 5 and record["steered"] is True
    assert len(record["top_features"]) == 4
    assert set(record["top_features"][0]) == {"index", "max_activation", "tokens", "label"}
    assert record["watchlist"][0]["index"] == WATCHED and record["watchlist"][0]["tokens"] >= 4
    assert record["sink_tokens"] == 0  # generated tokens only: none at position 0


def _monitor_line(server_config, request_id: str) -> dict:
    deadline = time.time() + 10
    while time.time() < deadline:
        lines = server_config["monitor"].read_text().splitlines() if server_config["monitor"].exists() else []
        mine = [r for r in map(json.loads, lines) if r["request_id"] == request_id and "sae" in r]
        if mine:
            return mine[0]
        time.sleep(0.2)
    raise AssertionError(f"no monitoring line for {request_id}")


def test_attention_sink_is_flagged_and_left_out_of_monitoring(server, hf, sae_layer, server_config):
    """Position 0's residual is ~100x the others' (measured here on the HF reference): inspect flags it as
    a sink, and the monitoring line of the same request counts it apart, its features in no top list."""
    ids = hf.tokenizer("The Golden Gate Bridge is red.").input_ids
    norms = hf.residual_after(sae_layer, ids).norm(dim=-1)  # [T]
    assert norms[0] > 50 * norms[1:].median()
    reply = requests.post(
        f"{BASE}/v1/completions",
        json={
            "model": "demo",
            "prompt": ids,
            "max_tokens": 3,
            "temperature": 0,
            "steering": {"inspect": {"prompt": True, "top_k": 8}},
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    steering = reply.json()["choices"][0]["steering"]
    assert steering["prompt_sinks"] == [0]
    sink_features = {f["index"] for f in steering["prompt_tokens"][0]["demo"]}
    other_features = {f["index"] for t in steering["prompt_tokens"][1:] for f in t["demo"]}
    other_features |= {f["index"] for t in steering["tokens"] for f in t["demo"]}
    line = _monitor_line(server_config, reply.json()["id"])
    # Positions read: the prompt's (the last one predicts generated token 1), then one per later token.
    assert line["sink_tokens"] == 1 and line["num_tokens"] == (len(ids) + 3 - 1) - 1
    only_at_sink = sink_features - other_features
    assert only_at_sink, "the sink's top features all fire elsewhere too: this check would prove nothing"
    assert not only_at_sink & {f["index"] for f in line["top_features"]}


# --- inline vectors, conditional operations, abort_when -----------------------------------------------------


def _unit_vector(steer_config_path: str) -> torch.Tensor:
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(steer_config_path).parent / "unit.safetensors"))["direction"]


def test_inline_vector_equals_the_same_vector_configured(server, steer_config_path):
    """The configured `unit` vector sent inline (as numbers and as base64 float32) steers exactly alike."""
    import base64

    vec = _unit_vector(steer_config_path)
    body = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    common = {"scale": 0.8, "normalize": True}
    configured = _chat({**body, "steering": {"vectors": [{"name": "unit", **common}]}})
    as_values = _chat(
        {**body, "steering": {"vectors": [{"values": vec.tolist(), "layer": VECTOR_LAYER, **common}]}}
    )
    b64 = base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
    as_base64 = _chat({**body, "steering": {"vectors": [{"base64": b64, "layer": VECTOR_LAYER, **common}]}})
    plain = _chat(body)
    text = configured["choices"][0]["message"]["content"]
    assert text != plain["choices"][0]["message"]["content"]
    for inline in (as_values, as_base64):
        choice = inline["choices"][0]
        assert choice["message"]["content"] == text
        assert choice["logprobs"] == configured["choices"][0]["logprobs"]
        assert choice["steering"]["applied"] == [
            {"op": "vector", "layer": VECTOR_LAYER, "positions": "all", "vector": None, "inline": True}
        ]


@pytest.mark.parametrize(
    ("vector", "status", "param"),
    [
        ({"values": [0.1] * 575, "layer": VECTOR_LAYER}, 400, "steering.vectors[0].values"),
        ({"values": [0.1] * 576, "layer": 3}, 400, "steering.vectors[0].layer"),
        ({"values": [5.0] * 576, "layer": VECTOR_LAYER}, 400, "steering.vectors[0].values"),  # norm 120 > 100
        ({"base64": "%%%", "layer": VECTOR_LAYER}, 400, "steering.vectors[0].base64"),
        ({"values": [0.1] * 576}, 400, "steering.vectors[0]"),
        ({"values": ["a"] * 576, "layer": VECTOR_LAYER}, 400, "steering.vectors[0].values[0]"),
    ],
)
def test_inline_vector_errors_name_the_field(server, vector, status, param):
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 2, "steering": {"vectors": [vector]}}
    reply = requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    three = {"vectors": [{"values": [0.1] * 576, "layer": VECTOR_LAYER}] * 3}  # max_inline_vectors is 2
    reply = requests.post(f"{BASE}/v1/chat/completions", json={**body, "steering": three}, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "steering.vectors"


def _prompt_reads(ids: list[int], steering: dict, traced: list[dict]) -> list[list[float]]:
    """Traced activations on every prompt token of a one-token completion with `steering`."""
    body = {
        "model": "demo",
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0,
        "steering": {**steering, "inspect": {"top_k": 1, "prompt": True, "features": traced}},
    }
    reply = requests.post(f"{BASE}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["steering"]["prompt_traced"]


def test_conditional_clamp_changes_exactly_the_tokens_where_the_condition_holds(
    server, hf, assets, sae_layer, demo_assets
):
    """ "When the bridge feature A > t, clamp feature B to 40", on the prompt: B (read after steering) changes on
    exactly the tokens where the HF reference says A > t, and nowhere else."""
    from steer_adapters.hf.reference import feature_value
    from steer_demo.concept import concept_feature

    a, b = concept_feature(demo_assets).index, WATCHED
    text = (
        "We walked across the Golden Gate Bridge, then took a ferry under the Bay Bridge to Oakland and back."
    )
    ids = hf.tokenizer(text)["input_ids"]
    x = hf.residual_after(sae_layer, ids)  # [T, d] unsteered: A at layer L is read before any edit there
    sae = assets.saes["demo"].sae
    f_a = [feature_value(sae, x[t], a) for t in range(len(ids))]
    positive = sorted(v for v in f_a[1:] if v > 0)
    assert len(positive) >= 2, f_a
    threshold = positive[len(positive) // 2] * 0.999  # the median token and those above it hold
    traced = [{"sae": "demo", "index": b}]
    plain = _prompt_reads(ids, {}, traced)
    clamp = {"sae": "demo", "index": b, "op": "clamp", "value": 40.0, "positions": "prompt"}
    steered = _prompt_reads(
        ids, {"features": [{**clamp, "when": {"sae": "demo", "index": a, "above": threshold}}]}, traced
    )
    checked = holds_count = 0
    for t in range(1, len(ids)):  # position 0: the attention sink
        if abs(f_a[t] - threshold) < 0.02 * threshold:
            continue  # fp32 kernels differ from HF in the last bits: too close to call
        holds = f_a[t] > threshold
        changed = abs(steered[t][0] - plain[t][0]) > 1e-3
        assert changed == holds, (t, f_a[t], threshold, plain[t][0], steered[t][0])
        checked += 1
        holds_count += holds
    assert checked >= 10 and 1 <= holds_count < checked


def test_abort_when_stops_at_the_token_where_the_feature_crosses(server, client, demo_assets, server_config):
    """Greedy answer about bridges: the same request with abort_when on the bridge feature ends with
    finish_reason "abort_when" exactly before the first token whose predicting residual reads the feature
    above the threshold (found from the unaborted answer's traced values), streaming and not."""
    from steer_demo.concept import concept_feature

    concept = concept_feature(demo_assets).index
    messages = [{"role": "user", "content": "Tell me about the Golden Gate Bridge."}]
    body = {"model": "demo", "messages": messages, "max_tokens": 40, "temperature": 0}
    full = _chat(
        {
            **body,
            "logprobs": True,
            "steering": {"inspect": {"top_k": 1, "features": [{"sae": "demo", "index": concept}]}},
        }
    )
    values = [v[0] for v in full["choices"][0]["steering"]["traced"]]
    tokens = [t["token"] for t in full["choices"][0]["logprobs"]["content"]]
    threshold = 2.0
    crossing = next(
        k for k, v in enumerate(values) if v > threshold
    )  # token k is predicted by a crossing residual
    assert crossing >= 2, values  # the answer starts before the concept fires
    before = metric("steer_aborted_requests_total", sae="demo")
    abort = {"abort_when": [{"sae": "demo", "index": concept, "above": threshold}]}
    stopped = _chat({**body, "logprobs": True, "steering": abort})
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "abort_when"
    kept = [t["token"] for t in choice["logprobs"]["content"]]
    assert kept[:crossing] == tokens[:crossing] and len(kept) <= crossing + 1  # + the forced end token
    info = choice["steering"]["abort"]
    assert (info["sae"], info["index"], info["above"], info["token"]) == (
        "demo",
        concept,
        threshold,
        crossing,
    )
    assert info["activation"] == pytest.approx(values[crossing], rel=1e-3)
    assert choice["message"]["content"].strip() == "".join(tokens[:crossing]).strip()
    # Streaming, through the OpenAI SDK: the same text, the same finish reason.
    chunks = list(client.chat.completions.create(**body, stream=True, extra_body={"steering": abort}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice["message"]["content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "abort_when"
    ]
    deadline = time.time() + 10  # counted and logged when the response closes
    while time.time() < deadline and metric("steer_aborted_requests_total", sae="demo") < before + 2:
        time.sleep(0.2)
    assert metric("steer_aborted_requests_total", sae="demo") == before + 2
    lines = [json.loads(line) for line in server_config["monitor"].read_text().splitlines()]
    events = [r for r in lines if r.get("event") == "abort" and r["request_id"] == stopped["id"]]
    assert events and events[0]["abort"]["token"] == crossing
    # Not crossing: the request runs to its length as usual.
    calm = _chat(
        {
            **body,
            "max_tokens": 8,
            "steering": {"abort_when": [{"sae": "demo", "index": concept, "above": 1e4}]},
        }
    )
    assert calm["choices"][0]["finish_reason"] == "length" and "abort" not in calm["choices"][0]["steering"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"ignore_eos": True}, "ignore_eos"),
        ({"min_tokens": 3}, "min_tokens"),
        ({"n": 2}, "steering.abort_when"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_abort_when_refuses_what_would_keep_it_from_stopping(server, extra, param):
    abort = {"abort_when": [{"sae": "demo", "index": 1, "above": 1.0}]}
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 2, "steering": abort, **extra}
    reply = requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


# --- probes -------------------------------------------------------------------------------------------------


def test_probe_scores_match_the_formula_on_the_reference_residuals(server, hf, server_config):
    """Eager server: per generated token and aggregated, a probe at the SAE's layer, one at a layer that
    only the probe reads, and one of the SAE's features (its encode written out from the SAE's files)."""
    check_chat_probe_scores(BASE, hf, server_config["probes"], MESSAGES)


def test_inspect_endpoint_scores_probes_on_every_prompt_token(server, hf, server_config):
    probes = server_config["probes"]
    text = "The Golden Gate Bridge spans the strait at the entrance of San Francisco Bay."
    reply = requests.post(
        f"{BASE}/v1/steering/inspect",
        json={"text": text, "saes": [], "probes": [p.id for p in probes]},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    ids = [d["token_id"] for d in data]
    for p in probes:
        want = p.formula(hf.residual_after(p.layer, ids))  # [T, C]
        for pos in range(1, len(ids)):  # position 0: the attention sink (fp32 rounding of a huge norm)
            got = np.array([data[pos]["probes"][p.id][label] for label in p.labels])
            assert abs(got - want[pos]).max() <= 1e-3 * max(1.0, abs(want[pos]).max()), (
                p.id,
                pos,
                got,
                want[pos],
            )


@pytest.mark.parametrize(
    ("inspect", "param"),
    [
        ({"probes": ["nope"]}, "steering.inspect.probes[0]"),
        ({"probes": "concept"}, "steering.inspect.probes"),
        ({"probes": [{"id": "concept"}]}, "steering.inspect.probes[0]"),
        ({"saes": []}, "steering.inspect.saes"),
    ],
)
def test_bad_probe_requests_name_the_field(server, inspect, param):
    reply = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "max_tokens": 2, "steering": {"inspect": inspect}},
        timeout=60,
    )
    assert (reply.status_code, reply.json()["error"]["param"]) == (400, param), reply.text
    assert requests.get(f"{BASE}/health", timeout=10).status_code == 200


def test_monitored_probe_is_logged_counted_and_flagged(server, hf, server_config):
    """monitoring.probes: a plain request's answer is scored; its aggregates (equal to the formula on the
    reference's residuals) go to the monitoring log and the histograms, and the rule flags it."""
    concept = next(p for p in server_config["probes"] if p.id == "concept")
    count = metric("steer_probe_request_score_count", probe="concept", label="on", aggregate="max")
    alerts = metric("steer_probe_alerts_total", probe="concept", label="on")
    reply = _chat(
        {"model": "demo", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    )
    assert "steering" not in reply["choices"][0] or "probes" not in reply["choices"][0]["steering"]
    deadline, line = time.time() + 10, None
    while time.time() < deadline and line is None:
        lines = server_config["monitor"].read_text().splitlines()
        found = [
            r for r in map(json.loads, lines) if r.get("event") == "probes" and r["request_id"] == reply["id"]
        ]
        line = found[0] if found else None
        time.sleep(0.2)
    assert line is not None and set(line["probes"]) == {"concept"} and line["steered"] is False
    ids = reply["prompt_token_ids"] + reply["choices"][0]["token_ids"]
    first, generated = len(reply["prompt_token_ids"]) - 1, len(reply["choices"][0]["token_ids"])
    want = concept.formula(hf.residual_after(concept.layer, ids)[first : first + generated])[:, 0]
    summary = line["probes"]["concept"]["on"]
    assert summary["max"] == pytest.approx(float(want.max()), abs=1e-3)
    assert summary["mean"] == pytest.approx(float(want.mean()), abs=1e-3) and summary["tokens"] == generated
    assert line["alerts"] == [{"probe": "concept", "label": "on", "max": summary["max"], "above": 0.0}]
    assert (
        metric("steer_probe_request_score_count", probe="concept", label="on", aggregate="max") == count + 1
    )
    assert metric("steer_probe_alerts_total", probe="concept", label="on") == alerts + 1


def test_abort_when_on_a_probe_stops_at_the_first_crossing(server):
    """The same greedy request with abort_when on a probe ends exactly before the first token whose
    predicting residual scores above the threshold (found from the unaborted answer's scores)."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me about the Golden Gate Bridge."}],
            "max_tokens": 30, "temperature": 0, "logprobs": True}  # fmt: skip
    full = _chat({**body, "steering": {"inspect": {"saes": [], "probes": ["concept"]}}})
    scores = [t["concept"]["on"] for t in full["choices"][0]["steering"]["probes"]]
    tokens = [t["token"] for t in full["choices"][0]["logprobs"]["content"]]
    threshold = max(scores[:2]) + 1e-4
    crossing = next(
        k for k, v in enumerate(scores) if v > threshold
    )  # token k: predicted by a crossing residual
    before = metric("steer_probe_aborted_requests_total", probe="concept")
    stopped = _chat(
        {**body, "steering": {"abort_when": [{"probe": "concept", "label": "on", "above": threshold}]}}
    )
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "abort_when"
    kept = [t["token"] for t in choice["logprobs"]["content"]]
    assert kept[:crossing] == tokens[:crossing] and len(kept) <= crossing + 1  # + the forced end token
    info = choice["steering"]["abort"]
    assert (info["probe"], info["label"], info["above"], info["token"]) == (
        "concept",
        "on",
        threshold,
        crossing,
    )
    assert info["score"] == pytest.approx(scores[crossing], abs=1e-4)
    deadline = time.time() + 10
    while (
        time.time() < deadline and metric("steer_probe_aborted_requests_total", probe="concept") < before + 1
    ):
        time.sleep(0.2)
    assert metric("steer_probe_aborted_requests_total", probe="concept") == before + 1
    calm = _chat({**body, "max_tokens": 6, "steering": {"abort_when": [{"probe": "concept", "above": 2.0}]}})
    assert calm["choices"][0]["finish_reason"] == "length"  # a sigmoid never passes 2


def test_a_windowed_abort_when_on_a_probe_stops_where_the_window_mean_first_crosses(server):
    """`window` W: the stop lands at the first generated token whose last-W scores' mean (written out here from
    the unaborted answer's per-token scores) crosses, later than a per-token condition with the same threshold."""
    import numpy as np

    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me about the Golden Gate Bridge."}],
            "max_tokens": 30, "temperature": 0, "logprobs": True}  # fmt: skip
    full = _chat({**body, "steering": {"inspect": {"saes": [], "probes": ["concept"]}}})
    scores = np.array([t["concept"]["on"] for t in full["choices"][0]["steering"]["probes"]])
    tokens = [t["token"] for t in full["choices"][0]["logprobs"]["content"]]
    window = 4
    means = np.convolve(scores, np.ones(window) / window, mode="valid")  # means[j]: tokens j .. j + 3

    def crossings(threshold: float) -> tuple[int | None, int | None]:
        """(first token over it, first token ending a window whose mean is over it)."""
        token = next((k for k, v in enumerate(scores) if v > threshold), None)
        windowed = next((j + window - 1 for j, m in enumerate(means) if m > threshold), None)
        return token, windowed

    # A threshold a single token passes earlier than any full window does (the test's point), from the data.
    candidates = [float(m) - 1e-4 for m in sorted(set(np.round(means, 6)))]
    threshold = next(t for t in candidates if None not in crossings(t) and crossings(t)[0] < crossings(t)[1])
    _, stop = crossings(threshold)
    stopped = _chat(
        {**body, "steering": {"abort_when": [{"probe": "concept", "above": threshold, "window": window}]}}
    )
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "abort_when"
    kept = [t["token"] for t in choice["logprobs"]["content"]]
    assert kept[:stop] == tokens[:stop] and len(kept) <= stop + 1  # + the forced end token
    info = choice["steering"]["abort"]
    assert (info["probe"], info["token"], info["window"]) == ("concept", stop, window)
    assert info["score"] == pytest.approx(means[stop - window + 1], abs=1e-4)  # the window's mean
