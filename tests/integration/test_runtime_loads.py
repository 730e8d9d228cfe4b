"""Runtime loads against the real server in vLLM's default compile mode: an SAE and a vector loaded while
serving steer exactly like their configured (or inline) twins, unloads wait for running requests, and every
admin error is a 4xx/507 naming the field while the engine keeps serving."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import requests
import torch
from safetensors.torch import save_file

from .conftest import running_server
from .probe_checks import check_chat_probe_scores, config_entries, make_probes

pytestmark = pytest.mark.server

PORT = 18797 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
KEY = "runtime-test-admin-key-0123456789"
API_KEY = "runtime-test-api-key"  # vLLM's own --api-key: the admin routes need both
BEARER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"X-Steer-Admin-Key": KEY, **BEARER}
RUNTIME_LAYER = 5  # nothing configured here: the op runs only because the layer is reserved
FEATURE, VALUE = 100, 60.0
MESSAGES = [{"role": "user", "content": "Describe a famous landmark in one sentence."}]
BODY = {
    "model": "demo",
    "messages": MESSAGES,
    "max_tokens": 10,
    "temperature": 0,
    "logprobs": True,
    "top_logprobs": 3,
}


@pytest.fixture(scope="module")
def root(demo_assets, tmp_path_factory):
    """The admin API's allowed root: a copy of the demo SAE and a random vector."""
    folder = tmp_path_factory.mktemp("runtime-root")
    shutil.copytree(demo_assets.sae_dir, folder / "demo-copy")
    vec = torch.randn(576, generator=torch.Generator().manual_seed(11))
    save_file({"v": vec / vec.norm()}, str(folder / "vec.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, assets, sae_layer, root, tmp_path_factory):
    config = json.loads(open(steer_config_path).read())
    d_sae = assets.saes["demo"].sae.d_sae
    config["runtime"] = {
        "layers": [sae_layer, RUNTIME_LAYER],
        "rows_per_layer": d_sae + 4,  # one SAE (plus a few vectors) per layer
        "roots": [str(root)],
    }
    folder = tmp_path_factory.mktemp("runtime-config")
    config["probes"] = config_entries(make_probes(folder, sae_layer))
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "STEER_ADMIN_KEY": KEY}
    with running_server(
        demo_assets.model_dir, str(path), PORT, "--api-key", API_KEY, env=env, compiled=True
    ) as proc:
        yield proc


def chat(steering: dict | None = None, **extra) -> dict:
    body = {**BODY, **extra, **({"steering": steering} if steering else {})}
    reply = requests.post(f"{BASE}/v1/chat/completions", json=body, headers=BEARER, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def clamp(sae: str) -> dict:
    return {"features": [{"sae": sae, "index": FEATURE, "op": "clamp", "value": VALUE}]}


def admin(method: str, path: str, body=None, headers=ADMIN, data: bytes | None = None) -> requests.Response:
    return requests.request(method, f"{BASE}{path}", json=body, data=data, headers=headers, timeout=300)


def metric(name: str, **labels) -> float:
    text = requests.get(f"{BASE}/metrics", headers=BEARER, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_runtime_sae_lifecycle_under_compile_mode(server, root):
    """Load a copy of the demo SAE as demo2: clamping through it equals clamping through the configured demo
    SAE (same text and log-probs: the op fires on the reserved rows inside the compiled model). Unloading is
    refused while a streaming request uses it, allowed after; the id is then unknown; a reload works again
    under a new revision; a second SAE beyond the layer's reserved rows gets a 507."""
    plain = chat()
    loaded = admin("POST", "/v1/steering/saes", {"id": "demo2", "path": str(root / "demo-copy")})
    assert loaded.status_code == 201, loaded.text
    revision = loaded.json()["revision"]
    listed = {
        s["id"]: s
        for s in requests.get(f"{BASE}/v1/steering/saes", headers=BEARER, timeout=30).json()["data"]
    }
    assert listed["demo2"]["revision"] == revision and listed["demo"]["revision"] is None
    configured, runtime = chat(clamp("demo")), chat(clamp("demo2"))
    assert runtime["message"]["content"] == configured["message"]["content"] != plain["message"]["content"]
    assert runtime["logprobs"] == configured["logprobs"]
    assert runtime["steering"]["applied"][0]["sae"] == "demo2"

    full = admin("POST", "/v1/steering/saes", {"id": "demo3", "path": str(root / "demo-copy")})
    assert full.status_code == 507 and "rows_per_layer" in full.json()["error"]["message"]

    stream = requests.post(
        f"{BASE}/v1/chat/completions",
        json={**BODY, "max_tokens": 200, "stream": True, "steering": clamp("demo2")},
        stream=True,
        headers=BEARER,
        timeout=300,
    )
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith(b"data:"))  # the request is running
    busy = admin("DELETE", "/v1/steering/saes/demo2")
    assert busy.status_code == 409 and "in use" in busy.json()["error"]["message"]
    for _ in lines:  # let it finish
        pass
    gone = admin("DELETE", "/v1/steering/saes/demo2")
    assert gone.status_code == 200 and gone.json()["deleted"], gone.text
    unknown = requests.post(
        f"{BASE}/v1/chat/completions", json={**BODY, "steering": clamp("demo2")}, headers=BEARER, timeout=60
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "steering.features[0].sae"

    again = admin("POST", "/v1/steering/saes", {"id": "demo2", "path": str(root / "demo-copy")})
    assert again.status_code == 201 and again.json()["revision"] != revision
    assert chat(clamp("demo2"))["logprobs"] == configured["logprobs"]
    assert metric("steer_runtime_loads_total", kind="sae", action="load", outcome="ok") == 2
    assert metric("steer_runtime_loads_total", kind="sae", action="unload", outcome="refused") >= 1
    assert metric("steer_runtime_loads_total", kind="sae", action="load", outcome="refused") >= 1


def test_runtime_vector_at_an_unconfigured_layer_equals_the_same_vector_inline(server, root):
    from safetensors.torch import load_file

    vec = load_file(str(root / "vec.safetensors"))["v"]
    loaded = admin(
        "POST",
        "/v1/steering/vectors",
        {"id": "rv", "path": str(root / "vec.safetensors"), "layer": RUNTIME_LAYER},
    )
    assert loaded.status_code == 201, loaded.text
    common = {"scale": 0.8, "normalize": True}
    by_name = chat({"vectors": [{"name": "rv", **common}]})
    inline = chat({"vectors": [{"values": vec.tolist(), "layer": RUNTIME_LAYER, **common}]})
    assert by_name["message"]["content"] != chat()["message"]["content"]
    assert by_name["logprobs"] == inline["logprobs"]
    assert admin("DELETE", "/v1/steering/vectors/rv").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "param"),
    [
        (
            "POST",
            "/v1/steering/saes",
            {"id": "x", "path": "ROOT/demo-copy"},
            BEARER,
            401,
            "x-steer-admin-key",
        ),
        (
            "POST",
            "/v1/steering/saes",
            {"id": "x", "path": "ROOT/demo-copy"},
            {"X-Steer-Admin-Key": "no", **BEARER},
            401,
            "x-steer-admin-key",
        ),
        ("DELETE", "/v1/steering/saes/demo", None, BEARER, 401, "x-steer-admin-key"),
        ("POST", "/v1/steering/saes", {"id": "x", "path": "/etc"}, ADMIN, 403, "path"),
        (
            "POST",
            "/v1/steering/saes",
            {"id": "x", "path": "ROOT/demo-copy", "allow_pickle": True},
            ADMIN,
            403,
            "allow_pickle",
        ),
        ("POST", "/v1/steering/saes", {"id": "x", "path": "ROOT/demo-copy", "bogus": 1}, ADMIN, 400, "bogus"),
        ("POST", "/v1/steering/saes", {"id": ["x"], "path": "ROOT/demo-copy"}, ADMIN, 400, "id"),
        ("POST", "/v1/steering/saes", {"id": "x", "path": "ROOT/vec.safetensors"}, ADMIN, 400, "path"),
        ("POST", "/v1/steering/saes", {"id": "demo", "path": "ROOT/demo-copy"}, ADMIN, 409, "id"),
        (
            "POST",
            "/v1/steering/vectors",
            {"id": "w", "path": "ROOT/vec.safetensors", "layer": 2},
            ADMIN,
            400,
            "layer",
        ),
        (
            "POST",
            "/v1/steering/vectors",
            {"id": "w", "path": "ROOT/vec.safetensors", "layer": 1e300},
            ADMIN,
            400,
            "layer",
        ),
        ("POST", "/v1/steering/saes/x", {}, ADMIN, 404, "path"),
        ("DELETE", "/v1/steering/saes/nothing", None, ADMIN, 404, "id"),
        ("DELETE", "/v1/steering/saes/demo", None, ADMIN, 409, "id"),
        ("DELETE", "/v1/steering/vectors/unit", None, ADMIN, 409, "id"),
    ],
)
def test_admin_errors_name_the_field_and_the_engine_keeps_serving(
    server, root, method, path, body, headers, status, param
):
    if isinstance(body, dict):
        body = {k: v.replace("ROOT", str(root)) if isinstance(v, str) else v for k, v in body.items()}
    reply = admin(method, path, body, headers=headers)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    assert chat(max_tokens=2)["finish_reason"] == "length"


@pytest.mark.parametrize(
    "raw", [b"{", b"[" * 5000 + b"]" * 5000, b"\xff\xfe", b'{"id": 1' + b"0" * 5000 + b"}"]
)
def test_admin_malformed_bodies_are_400(server, raw):
    reply = admin(
        "POST", "/v1/steering/saes", data=raw, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body"
    assert chat(max_tokens=2)["finish_reason"] == "length"


def test_openapi_documents_the_admin_routes(server):
    doc = requests.get(f"{BASE}/openapi.json", headers=BEARER, timeout=30).json()
    assert (
        "post" in doc["paths"]["/v1/steering/saes"] and "delete" in doc["paths"]["/v1/steering/vectors/{id}"]
    )
    for name, fields in (
        ("SAESource", {"id", "path", "layer", "labels", "allow_pickle"}),
        ("VectorSource", {"id", "path", "layer"}),
    ):
        props = doc["components"]["schemas"][name]["properties"]
        assert fields <= set(props) and all(props[f].get("description") for f in fields)


def test_admin_routes_also_need_the_servers_api_key(server, root):
    """vLLM's --api-key guards the admin routes like every other (checked before the admin key)."""
    body = {"id": "x", "path": str(root / "demo-copy")}
    for headers in ({"X-Steer-Admin-Key": KEY}, {"X-Steer-Admin-Key": KEY, "Authorization": "Bearer wrong"}):
        assert admin("POST", "/v1/steering/saes", body, headers=headers).status_code == 401
        assert admin("DELETE", "/v1/steering/saes/demo", headers=headers).status_code == 401
    assert "x" not in [
        s["id"] for s in requests.get(f"{BASE}/v1/steering/saes", headers=BEARER, timeout=30).json()["data"]
    ]


def test_bounded_admin_fuzz_never_breaks_the_server(server, root):
    """Valid load bodies with one field replaced by junk: every answer a 2xx or a 4xx/507 in the OpenAI error
    shape, never a 5xx; whatever loads is unloaded; unsteered output never drifts."""
    import random

    rng = random.Random(7)
    junk = [
        None,
        "",
        "x" * 5000,
        -1,
        2**80,
        1e308,
        float("nan"),
        True,
        [],
        {},
        [[[]]],
        {"a": {"b": {}}},
        "../../etc",
        "/",
    ]
    valid = [
        ("saes", {"id": "f", "path": str(root / "demo-copy")}),
        ("vectors", {"id": "g", "path": str(root / "vec.safetensors"), "layer": RUNTIME_LAYER}),
    ]
    fields = [
        "id",
        "path",
        "layer",
        "format",
        "labels",
        "options",
        "dtype",
        "allow_pickle",
        "tensor",
        "neuronpedia_id",
    ]
    reference = chat(max_tokens=4)["message"]["content"]
    statuses: dict[int, int] = {}
    for i in range(60):
        segment, body = rng.choice(valid)
        body = dict(body)
        body[rng.choice(fields)] = rng.choice(junk)
        raw = json.dumps(body, allow_nan=True).encode()
        reply = admin(
            "POST", f"/v1/steering/{segment}", data=raw, headers={**ADMIN, "Content-Type": "application/json"}
        )
        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
        assert reply.status_code in (201, 400, 403, 404, 409, 507), (body, reply.text[:300])
        if reply.status_code == 201:
            assert admin("DELETE", f"/v1/steering/{segment}/{reply.json()['id']}").status_code == 200
        else:
            assert {"message", "type", "param", "code"} <= set(reply.json()["error"])
        if i % 20 == 19:
            assert chat(max_tokens=4)["message"]["content"] == reference
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) >= 30, statuses


def test_probe_scores_match_the_formula_under_the_compiled_model(server, hf, sae_layer, tmp_path):
    """vLLM's default compile mode: the same check as the eager server's (test_server_api)."""
    check_chat_probe_scores(BASE, hf, make_probes(tmp_path, sae_layer), MESSAGES, headers=BEARER)
