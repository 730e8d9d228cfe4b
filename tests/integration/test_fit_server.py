"""Probes loaded and fitted, and steering vectors fitted, on the running server through the admin API: a probe
loaded at runtime scores by the formula on the HF reference's residuals and stops once unloaded; a probe fitted
from labelled texts of the demo corpus (the bridge prompts against the other topics) separates held-out texts
(AUROC >= 0.9, recomputed from the saved weights on the HF reference's residuals); a vector fitted from
contrastive pairs is the difference of means of the HF reference's pooled residuals (unit norm) and, added,
raises the demo's concept feature. Hostile fit bodies get a 4xx naming the field; the server keeps serving."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load_file

from steer_demo.prompts import BRIDGE_PROMPTS, OTHER_PROMPTS
from steer_plugin.probes.format import load_probe

from .conftest import running_server
from .probe_checks import check_chat_probe_scores, make_probes

pytestmark = pytest.mark.server

PORT = 18841 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
KEY = "fit-test-admin-key-0123456789"
ADMIN = {"X-Steer-Admin-Key": KEY}
SINKS = 1  # monitoring.sink_positions (the default): mean pooling leaves position 0 out
MESSAGES = [{"role": "user", "content": "Describe a famous landmark in one sentence."}]
OTHERS = [prompt for _, prompt in OTHER_PROMPTS]  # 99 texts of 28 other topics


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fit-root")


@pytest.fixture(scope="module")
def probes(root, sae_layer):
    """`concept` at the SAE's layer (captured), `early` at layer 4 (nothing there)."""
    return {p.id: p for p in make_probes(root / "made", sae_layer)}


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, sae_layer, root, tmp_path_factory):
    config = json.loads(open(steer_config_path).read())
    config["runtime"] = {"layers": [sae_layer], "rows_per_layer": 4, "roots": [str(root)]}
    folder = tmp_path_factory.mktemp("fit-config")
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "STEER_ADMIN_KEY": KEY}
    with running_server(demo_assets.model_dir, str(path), PORT, env=env) as proc:
        yield proc


def post(path: str, body=None, headers=ADMIN, data: bytes | None = None) -> requests.Response:
    return requests.post(f"{BASE}{path}", json=body, data=data, headers=headers, timeout=900)


def tokens(text: str) -> list[int]:
    reply = requests.post(f"{BASE}/tokenize", json={"prompt": text}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def pooled(hf, layer: int, text: str) -> np.ndarray:
    """The mean of the HF reference's residual rows after `layer`, position 0 (the attention sink) left out."""
    x = hf.residual_after(layer, tokens(text)).double().numpy()  # [T, d]
    return x[SINKS:].mean(0)


def auroc(truth: list[bool], scores: list[float]) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ranked right, ties counted half."""
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_a_probe_loaded_at_runtime_scores_by_the_formula_and_goes_when_unloaded(server, probes, hf):
    concept, early = probes["concept"], probes["early"]
    loaded = post("/v1/steering/probes", {"id": "concept", "path": concept.path})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["layer"] == concept.layer and loaded.json()["revision"]
    listed = requests.get(f"{BASE}/v1/steering/saes", timeout=30).json()["probes"]
    assert [p["id"] for p in listed] == ["concept"]
    check_chat_probe_scores(BASE, hf, [concept], MESSAGES)
    refused = post("/v1/steering/probes", {"id": "early", "path": early.path})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "layer", refused.text
    assert post("/v1/steering/probes", {"id": "concept", "path": concept.path}).status_code == 409
    assert post("/v1/steering/probes", {"id": "x", "path": concept.path}, headers={}).status_code == 401
    gone = requests.delete(f"{BASE}/v1/steering/probes/concept", headers=ADMIN, timeout=60)
    assert gone.status_code == 200 and gone.json()["deleted"], gone.text
    body = {
        "model": "demo",
        "messages": MESSAGES,
        "max_tokens": 2,
        "steering": {"inspect": {"probes": ["concept"]}},
    }
    asked = requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=60)
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "steering.inspect.probes[0]"


def test_a_probe_fitted_on_the_demo_corpus_separates_held_out_texts(server, hf, sae_layer):
    texts = [(t, "bridge") for t in BRIDGE_PROMPTS] + [(t, "other") for t in OTHERS]
    body = {
        "id": "bridge_probe",
        "layer": sae_layer,
        "labels": ["other", "bridge"],
        "pooling": "mean",
        "held_out": 0.25,
        "examples": [{"text": t, "label": label} for t, label in texts],
    }
    reply = post("/v1/steering/probes:fit", body)
    assert reply.status_code == 201, reply.text
    fit = reply.json()
    print("probe fit:", {k: fit[k] for k in ("auroc", "accuracy", "train", "held_out")})
    assert fit["labels"] == ["bridge"] and fit["held_out"] == math.ceil(0.25 * len(texts))
    assert fit["auroc"] >= 0.9 and fit["probe"]["revision"]
    # The saved probe, on the HF reference's residuals of the held-out texts: the same AUROC.
    probe = load_probe(fit["path"])
    assert probe.meta.layer == sae_layer and probe.meta.labels == ("bridge",)
    held = fit["held_out_indices"]
    x = torch.tensor(np.stack([pooled(hf, sae_layer, texts[i][0]) for i in held]))
    scores = torch.sigmoid(x @ probe.weight[0].double() + float(probe.bias[0])).tolist()
    truth = [texts[i][1] == "bridge" for i in held]
    assert auroc(truth, scores) >= 0.9
    assert abs(auroc(truth, scores) - fit["auroc"]) < 1e-6
    # Registered: a request scores it like any probe.
    check_chat_probe_scores_of(hf, probe, sae_layer)


def check_chat_probe_scores_of(hf, probe, layer: int) -> None:
    from .probe_checks import ServerProbe

    served = ServerProbe(
        "bridge_probe", "", layer, probe.meta.labels, probe.weight, probe.bias, "sigmoid", probe.meta.window
    )
    check_chat_probe_scores(BASE, hf, [served], MESSAGES)


def test_a_vector_fitted_from_pairs_is_the_difference_of_means_and_steers_toward_the_concept(
    server, hf, sae_layer, demo_assets
):
    from steer_demo.concept import concept_feature

    pairs = [{"positive": p, "negative": n} for p, n in zip(BRIDGE_PROMPTS[:12], OTHERS[:12])]
    body = {"id": "bridge_dir", "layer": sae_layer, "pooling": "mean", "pairs": pairs}
    reply = post("/v1/steering/vectors:fit", body)
    assert reply.status_code == 201, reply.text
    fit = reply.json()
    vec = load_file(fit["path"])["vector"].double()
    assert abs(float(vec.norm()) - 1.0) < 1e-5
    # mean(pool(positive)) - mean(pool(negative)), normalised, written out on the HF reference's residuals.
    pos = np.mean([pooled(hf, sae_layer, p["positive"]) for p in pairs], 0)
    neg = np.mean([pooled(hf, sae_layer, p["negative"]) for p in pairs], 0)
    want = torch.tensor(pos - neg)
    assert abs(fit["norm"] - float(want.norm())) <= 1e-3 * float(want.norm())
    cosine = float(vec @ want / want.norm())
    assert cosine > 0.999, cosine
    # Added (at the concept's layer), the concept feature reads higher on every generated token's residual.
    index = concept_feature(demo_assets).index
    inspect = {"saes": ["demo"], "top_k": 1, "features": [{"sae": "demo", "index": index}]}
    question = [{"role": "user", "content": "What should I see on a weekend trip? Answer in two sentences."}]

    def traced(steering: dict) -> float:
        chat = {"model": "demo", "messages": question, "max_tokens": 8, "temperature": 0}
        chat["steering"] = {**steering, "inspect": inspect}
        answer = requests.post(f"{BASE}/v1/chat/completions", json=chat, timeout=300)
        assert answer.status_code == 200, answer.text
        values = [t[0] for t in answer.json()["choices"][0]["steering"]["traced"]]
        return float(np.mean([v or 0.0 for v in values]))

    plain = traced({})
    steered = traced({"vectors": [{"name": "bridge_dir", "scale": 2.0 * fit["norm"]}]})
    print("concept feature: plain", plain, "steered", steered)
    assert steered > plain + 1.0


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("probes", {"id": "p", "layer": "15", "examples": []}, 400, "layer"),
        ("probes", {"id": "p", "layer": 4, "examples": [{"text": "a", "label": "x"}] * 4}, 400, "examples"),
        (
            "probes",
            {"id": "p", "layer": 4, "examples": [{"text": "a", "label": str(i % 2)} for i in range(4)]},
            400,
            "layer",
        ),  # noqa: E501
        (
            "probes",
            {"id": "p", "layer": 99, "examples": [{"text": "a", "label": str(i % 2)} for i in range(4)]},
            400,
            "layer",
        ),  # noqa: E501
        (
            "probes",
            {"id": "p", "layer": 15, "examples": [{"text": "a", "label": 1}] * 4},
            400,
            "examples[0].label",
        ),
        (
            "probes",
            {"id": "p", "layer": 15, "examples": [{"text": "", "label": "x"}] * 4},
            400,
            "examples[0].text",
        ),
        (
            "probes",
            {"id": "p", "layer": 15, "examples": [{"text": "a", "label": "x"}] * 600},
            400,
            "examples",
        ),
        (
            "probes",
            {
                "id": "p",
                "layer": 15,
                "examples": [{"text": "a", "label": str(i % 2)} for i in range(4)],
                "save_to": "../x",
            },
            400,
            "save_to",
        ),  # noqa: E501
        (
            "probes",
            {
                "id": "p",
                "layer": 15,
                "examples": [{"text": "a", "label": str(i % 2)} for i in range(4)],
                "labels": ["0", "2"],
            },
            400,
            "examples[1].label",
        ),  # noqa: E501
        (
            "probes",
            {"id": "p", "layer": 15, "examples": [{"text": "a" * 9000, "label": "x"}] * 4},
            400,
            "examples[0].text",
        ),  # noqa: E501
        (
            "probes",
            {
                "id": "p",
                "layer": 15,
                "examples": [{"text": "a", "label": str(i % 2)} for i in range(4)],
                "bogus": 1,
            },
            400,
            "bogus",
        ),  # noqa: E501
        ("probes", [1, 2], 400, "body"),
        ("vectors", {"id": "v", "layer": 15, "pairs": []}, 400, "pairs"),
        ("vectors", {"id": "v", "layer": 15, "pairs": [{"positive": "a"}]}, 400, "pairs[0].negative"),
        ("vectors", {"id": "v", "layer": 15, "pairs": [{"positive": "a", "negative": "a"}]}, 400, "pairs"),
        ("vectors", {"id": "v", "layer": 4, "pairs": [{"positive": "a", "negative": "b"}]}, 400, "layer"),
        (
            "vectors",
            {"id": "v", "layer": 15, "pooling": "max", "pairs": [{"positive": "a", "negative": "b"}]},
            400,
            "pooling",
        ),  # noqa: E501
    ],
)
def test_hostile_fit_bodies_get_a_4xx_naming_the_field(server, sae_layer, path, body, status, param):
    assert sae_layer == 15  # the bodies above name it
    reply = post(f"/v1/steering/{path}:fit", body)
    assert reply.status_code == status and reply.json()["error"]["param"] == param, reply.text


def test_nan_and_keys_are_refused_and_the_server_keeps_serving(server, sae_layer):
    examples = [{"text": "a b c", "label": str(i % 2)} for i in range(4)]
    raw = json.dumps({"id": "p", "layer": sae_layer, "examples": examples}).replace(
        "}]}", '}], "held_out": NaN}'
    )
    reply = post(
        "/v1/steering/probes:fit", data=raw.encode(), headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "held_out", reply.text
    assert post("/v1/steering/probes:fit", {"id": "p"}, headers={}).status_code == 401
    assert (
        post("/v1/steering/vectors:fit", {"id": "p"}, headers={"X-Steer-Admin-Key": "x" * 40}).status_code
        == 401
    )
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 2}
    assert requests.post(f"{BASE}/v1/chat/completions", json=body, timeout=120).status_code == 200
