"""The plugin's own routes that need nothing of the middleware but the service: discovery, runtime loads
(admin), the playground page and POST /v1/steering/inspect (which also calls the app in-process). Each is
`handler(service, scope, receive, send)`; errors are SpecErrors, which the middleware answers in the OpenAI error
shape."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, unquote

from steer_adapters.vllm.api import engine
from steer_adapters.vllm.api.asgi import read_body, send_body, send_json
from steer_plugin import playground
from steer_plugin.admin import ADMIN_KEY_HEADER, KINDS, LOAD_TIMEOUT_S
from steer_plugin.body import parse_json
from steer_plugin.messages import LoadCommand, LoadOutcome
from steer_plugin.request.schema import SpecError
from steer_plugin.service import SteeringService, error_body

# The wrapped app called in-process with a JSON POST: (status, JSON answer).
CallApp = Callable[[dict, str, dict], Awaitable[tuple[int, dict]]]

ADMIN_ROUTE = re.compile(r"/v1/steering/(saes|vectors|probes)(?:/([^/]+))?")


async def discovery(service: SteeringService | None, scope, receive, send):
    """GET /v1/steering/saes and /v1/steering/features (steer_plugin/discovery.py)."""
    if service is None:
        raise SpecError("steering", "no steering config", status=404)
    query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
    if scope["path"] == "/v1/steering/saes":
        result = service.discovery.list_saes()
    elif scope["path"] == "/v1/steering/features":
        limit = query.get("limit", "20")
        if not re.fullmatch(r"[0-9]{1,7}", limit):
            raise SpecError("limit", "must be an integer")
        index = query.get("index")
        if index is not None and not re.fullmatch(r"[0-9]{1,9}", index):
            raise SpecError("index", "must be a non-negative integer")
        result = service.discovery.search_features(
            query.get("sae"), query.get("q"), int(limit), int(index) if index is not None else None
        )
    else:
        raise SpecError("path", f"unknown steering endpoint {scope['path']}", status=404)
    return await send_json(send, 200, json.dumps(result).encode())


async def admin_route(service: SteeringService, scope, receive, send):
    """Runtime load (POST /v1/steering/saes|vectors|probes, the source in the body) and unload (DELETE
    /v1/steering/saes|vectors|probes/{id}); see steer_plugin/admin.py."""
    admin = service.admin
    admin.check_key(dict(scope["headers"]).get(ADMIN_KEY_HEADER))
    match = ADMIN_ROUTE.fullmatch(scope["path"])
    kind, source_id = KINDS[match.group(1)], match.group(2)
    workers = engine.EngineWorkers.of(scope["app"].state)
    if workers is None:
        raise SpecError("path", "the engine is not ready", status=503)
    count = workers.api_process_count
    if count != 1:
        raise SpecError(
            "path", f"runtime loads need --api-server-count 1 (this server runs {count})", status=409
        )
    if not workers.have_extension:
        raise SpecError("path", f"runtime loads are off: {engine.MISSING_EXTENSION}", status=503)

    async def broadcast(command: LoadCommand) -> list[LoadOutcome]:
        return await workers.load(command, timeout=LOAD_TIMEOUT_S)

    if scope["method"] == "POST":
        if source_id is not None:
            raise SpecError("path", "POST to /v1/steering/saes, /vectors or /probes", status=404)
        body = parse_json(await read_body(receive))
        result = await admin.load(kind, body, broadcast)
        return await send_json(send, 201, json.dumps(result).encode())
    if source_id is None:
        raise SpecError("path", "DELETE /v1/steering/saes|vectors|probes/{id}", status=404)
    result = await admin.unload(kind, unquote(source_id), broadcast)
    return await send_json(send, 200, json.dumps(result).encode())


async def playground_page(service: SteeringService | None, scope, receive, send):
    """The static playground page. It holds no data: every call it makes goes through the API (and its
    key), so it is served like /health, outside vLLM's /v1 authentication."""
    if service is None:
        raise SpecError("steering", "this server has no steering config", status=404)
    await send_body(
        send,
        200,
        playground.page(),
        b"text/html; charset=utf-8",
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", playground.content_security_policy()),
        (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers without CSP level 2
        (b"referrer-policy", b"no-referrer"),
    )


async def inspect_route(service: SteeringService | None, call_app: CallApp, scope, receive, send):
    """Text or chat messages in, top features of every token out: how a user finds the feature to steer."""
    try:
        if service is None:
            raise SpecError("steering", "this server has no steering config", status=404)
        req = parse_json(await read_body(receive))
        if not isinstance(req, dict):
            raise SpecError("body", "must be a JSON object")
        allowed = ("model", "text", "messages", "saes", "top_k", "features", "probes")
        unknown = set(req) - set(allowed)
        if unknown:
            raise SpecError(sorted(unknown)[0], f"unknown field; allowed: {', '.join(allowed)}")
        if ("text" in req) == ("messages" in req):
            raise SpecError("text", "give exactly one of `text` or `messages`")
        tokenize = {"prompt": req["text"]} if "text" in req else {"messages": req["messages"]}
        if "model" in req:
            tokenize["model"] = req["model"]
        status, tokens = await call_app(scope, "/tokenize", {**tokenize, "return_token_strs": True})
        if status != 200:
            return await send_json(send, status, json.dumps(tokens).encode())
        inspect = {
            "top_k": req.get("top_k", 5),
            "prompt": True,
            **{key: req[key] for key in ("saes", "features", "probes") if key in req},
        }
        completion = {
            "prompt": tokens["tokens"],
            "max_tokens": 1,
            "temperature": 0,
            "steering": {"inspect": inspect},
        }
        if "model" in req:
            completion["model"] = req["model"]
        status, result = await call_app(scope, "/v1/completions", completion)
        if status != 200:
            return await send_json(send, status, json.dumps(result).encode())
    except SpecError as err:
        return await send_json(send, err.status, error_body(err))
    steering = result["choices"][0]["steering"]
    features = steering.get("prompt_tokens", [])
    strs = tokens.get("token_strs") or [None] * len(tokens["tokens"])
    sinks = set(steering.get("prompt_sinks", []))
    data = [
        {"position": i, "token_id": t, "token": s, "features": f, "sink": i in sinks}
        for i, (t, s, f) in enumerate(zip(tokens["tokens"], strs, features))
    ]
    out = {"object": "list", "model": result.get("model"), "data": data}
    if "traced_features" in steering:
        out["traced_features"] = steering["traced_features"]
        for item, values in zip(data, steering.get("prompt_traced", [])):
            item["traced"] = values
    for item, scores in zip(data, steering.get("prompt_probes", [])):
        item["probes"] = scores
    return await send_json(send, 200, json.dumps(out).encode())
