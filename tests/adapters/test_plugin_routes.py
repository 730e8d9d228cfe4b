"""The plugin's own routes (api/routes.py) through the middleware, against a stand-in for vLLM's app: which requests
the plugin answers and which reach vLLM untouched, the errors each answers (the status and the `param` the
integration tests assert), vLLM's authentication in front of them, and the /openapi.json entries generated from
the routes' models.

The service is tests/test_service.py's: SAEs "a" (10 features, feature 7 labelled "bridge") and "b", vector "v".
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest

from steer_adapters.vllm.api import engine as api_engine
from steer_adapters.vllm.api import middleware as middleware_module
from steer_adapters.vllm.api import route_models
from steer_adapters.vllm.api.openapi import add_steering_to_openapi
from steer_adapters.vllm.api.route_models import FeatureList, InspectRequest, InspectResponse, SAEList
from steer_plugin.messages import LoadOutcome
from steer_plugin.request.schema import MAX_TRACED, SpecError, parse_spec
from tests.test_service import service as make_service

pytest.importorskip("vllm")

ADMIN_KEY = "k" * 24
VLLM_STATUS = 299  # what the stand-in for vLLM answers


class VLLMApp:
    """vLLM's app as the middleware sees it: records what reaches it."""

    def __init__(self, user_middleware=()):
        self.seen: list[tuple[str, str]] = []
        self.state = SimpleNamespace()
        self.user_middleware = list(user_middleware)

    async def __call__(self, scope, receive, send):
        self.seen.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": VLLM_STATUS, "headers": []})
        await send({"type": "http.response.body", "body": b"vllm"})


def build(tmp_path, monkeypatch, service=None, app=None, **config):
    """The middleware around `app`, serving `service` (tests/test_service.py's by default; None: no config)."""
    app = app or VLLMApp()
    if service is None and config.get("no_config"):
        monkeypatch.delenv("STEER_PLUGIN_CONFIG", raising=False)
    else:
        path = tmp_path / "steer.json"
        path.write_text(json.dumps({"vectors": []}))
        monkeypatch.setenv("STEER_PLUGIN_CONFIG", str(path))
        service = service or make_service()
        monkeypatch.setattr(middleware_module, "SteeringService", lambda _config: service)
    return middleware_module.SteeringMiddleware(app), app


def call(mw, app, method, path, body=b"", query=None, headers=()):
    """One request through the middleware: (status, headers, body bytes)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": urlencode(query or {}).encode() if not isinstance(query, bytes) else query,
        "headers": [(b"content-type", b"application/json"), *headers],
        "app": app,
    }
    sent: list[dict] = []
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), content


def error(reply) -> tuple[int, str]:
    status, _, content = reply
    return status, json.loads(content)["error"]["param"]


# --- which requests the plugin answers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "ours"),
    [
        ("GET", "/v1/steering/saes", True),
        ("GET", "/v1/steering/features", True),
        ("GET", "/v1/steering/inspect", True),  # any GET under /v1/steering/: a 404 naming the path
        ("GET", "/v1/steering/", True),
        ("GET", "/playground", True),
        ("GET", "/playground//", True),
        ("HEAD", "/v1/steering/saes", False),
        ("GET", "/playgrounds", False),
        ("GET", "/v1/steeringx/saes", False),
        ("PUT", "/v1/steering/inspect", False),
        ("DELETE", "/v1/steering/saes/x", False),  # no runtime loads configured: no admin routes
        ("POST", "/v1/steering/saes", False),  # (reaches vLLM through the reserved-key guard)
        ("GET", "/v1/models", False),
    ],
)
def test_only_the_plugins_paths_and_methods_are_answered_by_it(tmp_path, monkeypatch, method, path, ours):
    mw, app = build(tmp_path, monkeypatch)
    status, _, _ = call(mw, app, method, path, body=b"{}")
    assert (status != VLLM_STATUS, bool(app.seen)) == (ours, not ours)


def test_discovery_answers_what_the_models_describe(tmp_path, monkeypatch):
    mw, app = build(tmp_path, monkeypatch)
    status, headers, content = call(mw, app, "GET", "/v1/steering/saes")
    assert status == 200 and headers[b"content-type"] == b"application/json"
    listed = SAEList.model_validate_json(content)
    assert [s.id for s in listed.data] == ["a", "b"] and [v.id for v in listed.vectors] == ["v"]
    status, _, content = call(mw, app, "GET", "/v1/steering/features", query={"q": "bridge"})
    assert status == 200
    found = FeatureList.model_validate_json(content)
    assert [(h.sae, h.index, h.match) for h in found.data] == [("a", 7, "exact")] and found.total == 1
    one = call(mw, app, "GET", "/v1/steering/features", query={"sae": "b", "index": "3"})
    assert FeatureList.model_validate_json(one[2]).data[0].index == 3


@pytest.mark.parametrize(
    ("query", "status", "param"),
    [
        (b"limit=%C2%B2", 400, "limit"),  # a Unicode digit
        (b"limit=x", 400, "limit"),
        (b"limit=12345678", 400, "limit"),
        (b"limit=0", 400, "limit"),  # (the range: steer_plugin.discovery)
        (b"sae=a&index=-1", 400, "index"),
        (b"sae=a&index=%D9%A3", 400, "index"),
        (b"index=1", 400, "index"),
        (b"sae=a&index=10", 404, "index"),
        (b"sae=nope&limit=0", 404, "sae"),  # the SAE is checked before the limit's range
        (b"sae=nope&sae=", 404, "sae"),  # a blank value is no value: the last given one counts
    ],
)
def test_feature_search_errors_name_the_parameter(tmp_path, monkeypatch, query, status, param):
    mw, app = build(tmp_path, monkeypatch)
    assert error(call(mw, app, "GET", "/v1/steering/features", query=query)) == (status, param)


def test_blank_and_repeated_query_values_read_as_before(tmp_path, monkeypatch):
    mw, app = build(tmp_path, monkeypatch)
    status, _, content = call(mw, app, "GET", "/v1/steering/features", query=b"sae=&limit=&q=x&q=bridge")
    assert status == 200 and json.loads(content)["data"][0]["index"] == 7


# --- inspect --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"[1]", "body"),
        (b'{"text": ' + b"[" * 500 + b"]" * 500 + b"}", "body"),  # steer_plugin.body.parse_json's depth limit
        (b"\xff\xfe{}", "body"),
        ({"text": "x", "zeta": 1, "alpha": 2}, "alpha"),
        ({"text": "x", "messages": []}, "text"),
        ({"top_k": 3}, "text"),
        ({"text": "x", "prompt": True, "messages": []}, "prompt"),  # unknown fields first
        ({"text": 5}, "text"),
        ({"messages": "hi"}, "messages"),
        ({"text": "x", "top_k": 0}, "steering.inspect.top_k"),
        ({"text": "x", "saes": "a"}, "steering.inspect.saes"),
        ({"text": "x", "features": [{"sae": "a"}]}, "steering.inspect.features[0]"),
        (
            {"text": "x", "features": [{"sae": "a", "index": 1, "bogus": 1}]},
            "steering.inspect.features[0].bogus",
        ),
        (
            {"text": "x", "features": [{"sae": "a", "index": 1}] * (MAX_TRACED + 1)},
            "steering.inspect.features",
        ),
        ({"text": "x", "features": "a/1"}, "steering.inspect.features"),
        ({"text": "x", "probes": [1]}, "steering.inspect.probes[0]"),
    ],
)
def test_inspect_refuses_a_bad_body_before_calling_vllm(tmp_path, monkeypatch, body, param):
    mw, app = build(tmp_path, monkeypatch)
    assert error(call(mw, app, "POST", "/v1/steering/inspect", body=body)) == (400, param)
    assert app.seen == []


@pytest.mark.parametrize(
    "inspect",
    [
        {"top_k": 0},
        {"top_k": "x", "saes": 1},
        {"features": [{"sae": "a"}]},
        {"features": [{"id": "m/s/1", "sae": "a"}]},
        {"features": "a/1"},
        {"probes": ["p"] * 40},
    ],
)
def test_inspect_names_a_field_as_the_completion_path_does(inspect):
    """The route's fields passed on to `steering.inspect` are refused with the completion's path and message."""
    with pytest.raises(SpecError) as direct:
        parse_spec({"inspect": inspect})
    with pytest.raises(SpecError) as routed:
        route_models.validated(InspectRequest, {"text": "x", **inspect}, InspectRequest.param_prefix)
    assert (routed.value.path, routed.value.message) == (direct.value.path, direct.value.message)


def test_inspect_tokenizes_then_observes_the_prompt(tmp_path, monkeypatch):
    mw, app = build(tmp_path, monkeypatch)
    calls = []

    async def call_app(scope, path, payload):
        calls.append((path, payload))
        if path == "/tokenize":
            return 200, {"tokens": [5, 6], "token_strs": ["Hi", "!"]}
        steering = {
            "prompt_tokens": [{"a": [{"index": 7, "activation": 2.0, "label": "bridge"}]}, {"a": []}],
            "prompt_sinks": [0],
            "traced_features": [{"sae": "a", "index": 7, "label": "bridge"}],
            "prompt_traced": [[2.0], [None]],
            "prompt_probes": [{"p": {"yes": 0.5}}, {"p": {"yes": 0.25}}],
        }
        return 200, {"model": "m", "choices": [{"steering": steering}]}

    monkeypatch.setattr(mw.routes.endpoints, "call_app", call_app)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "features": [{"sae": "a", "index": 7}],
    }
    status, _, content = call(mw, app, "POST", "/v1/steering/inspect", body={**body, "probes": ["p"]})
    assert status == 200, content
    assert calls == [
        ("/tokenize", {"messages": body["messages"], "model": "m", "return_token_strs": True}),
        (
            "/v1/completions",
            {
                "prompt": [5, 6],
                "max_tokens": 1,
                "temperature": 0,
                "model": "m",
                "steering": {
                    "inspect": {"top_k": 5, "prompt": True, "features": body["features"], "probes": ["p"]}
                },
            },
        ),
    ]
    answer = InspectResponse.model_validate_json(content)
    assert [(t.token, t.sink, t.traced, t.probes) for t in answer.data] == [
        ("Hi", True, [2.0], {"p": {"yes": 0.5}}),
        ("!", False, [None], {"p": {"yes": 0.25}}),
    ]


def test_an_error_from_vllm_is_passed_on(tmp_path, monkeypatch):
    mw, app = build(tmp_path, monkeypatch)
    no_model = {"error": {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}}

    async def call_app(scope, path, payload):
        return 404, no_model

    monkeypatch.setattr(mw.routes.endpoints, "call_app", call_app)
    status, _, content = call(mw, app, "POST", "/v1/steering/inspect", body={"text": "x", "model": "nope"})
    assert (status, json.loads(content)) == (404, no_model)


# --- no config, the playground, internal errors, authentication ---------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/steering/saes"),
        ("GET", "/v1/steering/x"),
        ("POST", "/v1/steering/inspect"),
        ("GET", "/playground"),
    ],
)
def test_without_a_config_the_routes_are_404_naming_steering(tmp_path, monkeypatch, method, path):
    mw, app = build(tmp_path, monkeypatch, no_config=True)
    assert error(call(mw, app, method, path, body={"text": "x"})) == (404, "steering")


def test_the_playground_page_and_its_headers(tmp_path, monkeypatch):
    mw, app = build(tmp_path, monkeypatch)
    status, headers, content = call(mw, app, "GET", "/playground/")
    assert status == 200 and content.startswith(b"<!")
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert headers[b"x-frame-options"] == b"DENY" and headers[b"referrer-policy"] == b"no-referrer"
    assert b"default-src" in headers[b"content-security-policy"] and headers[b"cache-control"] == b"no-cache"


def test_an_unexpected_error_is_a_500_without_its_text(tmp_path, monkeypatch):
    service = make_service()
    mw, app = build(tmp_path, monkeypatch, service=service)

    def broken():
        raise RuntimeError("secret detail")

    monkeypatch.setattr(service.discovery, "list_saes", broken)
    status, _, content = call(mw, app, "GET", "/v1/steering/saes")
    assert status == 500 and b"secret" not in content and b"Traceback" not in content
    assert json.loads(content)["error"]["message"].endswith("internal error in the steering plugin")


def test_vllms_api_key_guards_the_routes_but_not_the_page(tmp_path, monkeypatch):
    from starlette.middleware import Middleware
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    app = VLLMApp([Middleware(AuthenticationMiddleware, tokens=["sk-1"])])
    mw, app = build(tmp_path, monkeypatch, app=app)
    for method, path in (
        ("GET", "/v1/steering/saes"),
        ("POST", "/v1/steering/inspect"),
        ("GET", "/v1/steering/x"),
    ):
        assert call(mw, app, method, path, body=b"[")[0] == 401
        assert call(mw, app, method, path, body=b"[", headers=[(b"authorization", b"Bearer no")])[0] == 401
    assert call(mw, app, "GET", "/v1/steering/saes", headers=[(b"authorization", b"Bearer sk-1")])[0] == 200
    assert call(mw, app, "GET", "/playground")[0] == 200
    assert app.seen == []


# --- runtime loads ------------------------------------------------------------------------------------------


@pytest.fixture
def admin_mw(tmp_path, monkeypatch):
    runtime = {"layers": [3], "rows_per_layer": 4, "roots": [str(tmp_path)], "admin_key": ADMIN_KEY}
    monkeypatch.delenv("STEER_ADMIN_KEY", raising=False)
    mw, app = build(tmp_path, monkeypatch, service=make_service(runtime=runtime))

    async def broadcast(command):  # the workers' registry: nothing loaded at runtime
        return [LoadOutcome(True, generation=0)]

    workers = SimpleNamespace(api_process_count=1, have_extension=True, broadcast=broadcast)
    monkeypatch.setattr(api_engine.EngineWorkers, "of", staticmethod(lambda state: workers))
    return mw, app


KEY = [(b"x-steer-admin-key", ADMIN_KEY.encode())]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "param"),
    [
        ("POST", "/v1/steering/saes", (), {}, 401, "x-steer-admin-key"),
        ("POST", "/v1/steering/saes/x", (), {}, 401, "x-steer-admin-key"),  # the key before the path
        ("DELETE", "/v1/steering/vectors", [(b"x-steer-admin-key", b"wrong")], b"", 401, "x-steer-admin-key"),
        ("POST", "/v1/steering/saes/x", KEY, {}, 404, "path"),
        ("DELETE", "/v1/steering/vectors", KEY, b"", 404, "path"),
        ("DELETE", "/v1/steering/vectors/v", KEY, b"", 409, "id"),  # configured at start-up
        ("DELETE", "/v1/steering/saes/nothing", KEY, b"", 404, "id"),
        ("POST", "/v1/steering/saes", KEY, b"{", 400, "body"),
        ("POST", "/v1/steering/saes", KEY, {"id": "x"}, 400, "path"),
        ("POST", "/v1/steering/saes", KEY, {"id": "x", "release": "r"}, 400, "release"),
        ("POST", "/v1/steering/vectors", KEY, {"id": "x", "path": "/etc/passwd", "layer": 3}, 403, "path"),
    ],
)
def test_admin_routes_answer_as_before(admin_mw, method, path, headers, body, status, param):
    mw, app = admin_mw
    assert error(call(mw, app, method, path, body=body, headers=headers)) == (status, param)
    assert app.seen == []


def test_an_unload_reads_the_id_percent_decoded_once_more(admin_mw):
    mw, app = admin_mw
    status, _, content = call(mw, app, "DELETE", "/v1/steering/saes/a%20b", headers=KEY)
    assert status == 404 and "'a b'" in json.loads(content)["error"]["message"]


# --- /openapi.json ------------------------------------------------------------------------------------------


def stand_in() -> dict:
    return {"components": {"schemas": {"CompletionRequest": {"type": "object", "properties": {}}}}}


def resolve(doc: dict, ref: dict) -> dict:
    return doc["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]


def test_openapi_entries_come_from_the_route_models():
    doc = add_steering_to_openapi(stand_in(), admin=False)
    paths = doc["paths"]
    assert {(p, m) for p, ms in paths.items() for m in ms} == {
        ("/v1/steering/saes", "get"),
        ("/v1/steering/features", "get"),
        ("/v1/steering/inspect", "post"),
    }
    inspect = paths["/v1/steering/inspect"]["post"]
    body = resolve(doc, inspect["requestBody"]["content"]["application/json"]["schema"])
    assert list(body["properties"]) == list(InspectRequest.model_fields)
    assert body["properties"]["features"]["items"] == {"$ref": "#/components/schemas/FeatureRef"}
    answer = resolve(doc, inspect["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(answer["properties"]) == set(InspectResponse.model_fields)
    query = {p["name"]: p for p in paths["/v1/steering/features"]["get"]["parameters"]}
    assert list(query) == list(route_models.FeatureSearchQuery.model_fields)
    assert query["limit"]["schema"] == {"type": "integer", "default": 20, "minimum": 1, "maximum": 1000}
    assert query["index"]["schema"]["type"] == "integer" and not query["sae"]["required"]
    assert query["q"]["description"].startswith("Matched against labels")
    saes = resolve(
        doc, paths["/v1/steering/saes"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    )
    assert set(saes["properties"]) == set(SAEList.model_fields)
    assert doc["components"]["schemas"]["CompletionRequest"]["properties"]["steering"]


def test_openapi_documents_the_admin_routes_only_when_they_exist():
    doc = add_steering_to_openapi(stand_in(), admin=True)
    assert set(doc["paths"]["/v1/steering/saes"]) == {"get", "post"}
    load = doc["paths"]["/v1/steering/vectors"]["post"]
    assert load["parameters"][0]["name"] == "X-Steer-Admin-Key"
    assert (
        resolve(doc, load["requestBody"]["content"]["application/json"]["schema"])["title"] == "VectorSource"
    )
    unload = doc["paths"]["/v1/steering/saes/{id}"]["delete"]
    assert [p["name"] for p in unload["parameters"]] == ["X-Steer-Admin-Key", "id"]
    assert set(unload["responses"]) == {"200", "401", "404", "409"}
    assert add_steering_to_openapi(stand_in(), admin=True, routes=False).get("paths", {}) == {}
