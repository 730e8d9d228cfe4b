"""ASGI middleware for vLLM's OpenAI server (`--middleware steer_adapters.vllm.middleware.SteeringMiddleware`).

- POST /v1/chat/completions and /v1/completions: validates the `steering` field (400 naming the JSON path
  on error) and hands the resolved ops to vLLM in `vllm_xargs`; the engine never sees an invalid spec.
- GET /v1/steering/saes, GET /v1/steering/features?sae=&q=: discovery.
- GET /openapi.json: publishes the `steering` schema on both completion requests.
The config comes from STEER_PLUGIN_CONFIG (set by `steer-serve`).
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs

from steer_plugin.config import config_from_sources
from steer_plugin.service import SteeringService, error_body
from steer_plugin.spec import SpecError, SteeringSpec

logger = logging.getLogger("steer_plugin")

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest")


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_json(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _with_body(scope: dict, body: bytes, receive_client):
    """A new scope and receive() that replay `body` (content-length fixed), then wait on the real client
    (vLLM cancels a request when receive() reports a disconnect)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive_client()

    return {**scope, "headers": headers}, receive


def add_steering_to_openapi(doc: dict) -> dict:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    spec_schema = SteeringSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in spec_schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas["SteeringSpec"] = spec_schema
    for name in REQUEST_SCHEMAS:
        if name in schemas:
            schemas[name].setdefault("properties", {})["steering"] = {
                "anyOf": [{"$ref": "#/components/schemas/SteeringSpec"}, {"type": "null"}],
                "description": "Per-request SAE feature steering and inspection (steer_plugin).",
            }
    return doc


class SteeringMiddleware:
    def __init__(self, app):
        self.app = app
        config = config_from_sources(None)
        self.service = SteeringService(config) if config is not None else None
        if self.service is None:
            logger.warning("steer_plugin middleware: STEER_PLUGIN_CONFIG is not set; `steering` fields get a 400")
        else:
            logger.info("steer_plugin middleware: serving SAEs %s", sorted(self.service.catalog.saes))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in COMPLETION_PATHS:
            return await self._completion(scope, receive, send)
        if method == "GET" and path.startswith("/v1/steering/"):
            return await self._discovery(scope, send)
        if method == "GET" and path == "/openapi.json":
            return await self._openapi(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _completion(self, scope, receive, send):
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and "steering" in body:
            try:
                if self.service is None:
                    raise SpecError("steering", "this server has no steering config (start it with steer-serve)")
                body = self.service.rewrite_request(body).body
            except SpecError as err:
                return await _send_json(send, err.status, error_body(err))
            raw = json.dumps(body).encode()
        scope, replay = _with_body(scope, raw, receive)
        return await self.app(scope, replay, send)

    async def _discovery(self, scope, send):
        if self.service is None:
            return await _send_json(send, 404, error_body(SpecError("steering", "no steering config", status=404)))
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        try:
            if scope["path"] == "/v1/steering/saes":
                result = self.service.list_saes()
            elif scope["path"] == "/v1/steering/features":
                limit = query.get("limit", "20")
                if not limit.isdigit():
                    raise SpecError("limit", "must be an integer")
                result = self.service.search_features(query.get("sae"), query.get("q"), int(limit))
            else:
                raise SpecError("path", f"unknown steering endpoint {scope['path']}", status=404)
        except SpecError as err:
            return await _send_json(send, err.status, error_body(err))
        return await _send_json(send, 200, json.dumps(result).encode())

    async def _openapi(self, scope, receive, send):
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(add_steering_to_openapi(json.loads(body))).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": body})
