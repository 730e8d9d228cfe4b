"""ASGI middleware for vLLM's OpenAI server (`--middleware steer_adapters.vllm.middleware.SteeringMiddleware`).

- POST /v1/chat/completions and /v1/completions: validates the `steering` field (400 naming the JSON path
  on error) and hands the resolved ops to vLLM in `vllm_xargs`; the engine never sees an invalid spec.
- GET /v1/steering/saes, GET /v1/steering/features?sae=&q=: discovery.
- GET /openapi.json: publishes the `steering` schema on both completion requests.
The config comes from STEER_PLUGIN_CONFIG (set by `steer-serve`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import parse_qs

from steer_plugin.config import config_from_sources
from steer_plugin.metrics import WORKER_STATS, register_worker_collector
from steer_plugin.service import RewrittenRequest, SteeringService, error_body
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


class ResponseRewriter:
    """Adds `steering` to each choice of a completion response: the applied ops, and per-token features
    (like `logprobs`), chunk by chunk when streaming. Writes the monitoring line when the response ends."""

    def __init__(self, service: SteeringService, request: RewrittenRequest, send, stream: bool):
        self.service = service
        self.request = request
        self.downstream = send
        self.stream = stream
        self.observation = service.observation(request)
        self.status = 200
        self.start: dict | None = None
        self.buffer = b""
        self.first_chunk = True
        self.response_id = self.model = None
        self.closed = False

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status != 200 or self.stream:
                return await self.downstream(message)
            self.start = message  # sent with the rewritten body
            return
        if message["type"] != "http.response.body" or self.status != 200:
            return await self.downstream(message)
        self.buffer += message.get("body", b"")
        if self.stream:
            events, _, self.buffer = self.buffer.rpartition(b"\n\n")
            out = b"".join(self._rewrite_event(e) for e in events.split(b"\n\n") if e) if events else b""
            if message.get("more_body") and not out:
                return
            return await self.downstream({**message, "body": out})
        if message.get("more_body"):
            return
        body = self._rewrite_full(self.buffer)
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.downstream({**self.start, "headers": headers})
        await self.downstream({"type": "http.response.body", "body": body})

    def _choice_steering(self, choice: dict, count: int, first: bool) -> dict:
        info: dict = {}
        if first:
            info["applied"] = self.service.applied(self.request.ops)
        if self.observation is not None and self.request.inspect is not None:
            info["tokens"] = self.observation.next_tokens(count)
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            choice.pop("token_ids", None)
        return info

    def _rewrite_full(self, raw: bytes) -> bytes:
        data = json.loads(raw)
        self.response_id, self.model = data.get("id"), data.get("model")
        for choice in data.get("choices", []):
            count = len(choice.get("token_ids") or [])
            choice["steering"] = self._choice_steering(choice, count, first=True)
            if self.request.inspect is not None and self.request.inspect.prompt:
                choice["steering"]["prompt_tokens"] = self.observation.prompt_tokens()
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            data.pop("prompt_token_ids", None)
        return json.dumps(data).encode()

    def _rewrite_event(self, event: bytes) -> bytes:
        text = event.decode()
        if not text.startswith("data: ") or text.strip() == "data: [DONE]":
            return event + b"\n\n"
        data = json.loads(text[len("data: ") :])
        self.response_id, self.model = data.get("id", self.response_id), data.get("model", self.model)
        for choice in data.get("choices", []):
            count = len(choice.get("token_ids") or [])
            choice["steering"] = self._choice_steering(choice, count, first=self.first_chunk)
        if data.get("choices"):
            self.first_chunk = False
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            data.pop("prompt_token_ids", None)
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def close(self) -> None:
        if not self.closed and self.observation is not None:
            self.closed = True
            self.observation.finish(self.response_id, self.model)


class SteeringMiddleware:
    def __init__(self, app):
        self.app = app
        config = config_from_sources(None)
        self.service = SteeringService(config) if config is not None else None
        if self.service is None:
            logger.warning(
                "steer_plugin middleware: STEER_PLUGIN_CONFIG is not set; `steering` fields get a 400"
            )
        else:
            register_worker_collector()
            logger.info("steer_plugin middleware: serving SAEs %s", sorted(self.service.catalog.saes))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in COMPLETION_PATHS:
            return await self._completion(scope, receive, send)
        if method == "POST" and path == "/v1/steering/inspect":
            return await self._inspect(scope, receive, send)
        if method == "GET" and path.startswith("/v1/steering/"):
            return await self._discovery(scope, send)
        if method == "GET" and path.rstrip("/") == "/metrics" and self.service is not None:
            await self._pull_worker_stats(scope)
        if method == "GET" and path == "/openapi.json":
            return await self._openapi(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _completion(self, scope, receive, send):
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        request = None
        if isinstance(body, dict) and self.service is not None:
            had_steering = "steering" in body
            try:
                request = self.service.rewrite_request(body)
            except SpecError as err:
                return await _send_json(send, err.status, error_body(err))
            if had_steering or request.ops or request.observe is not None:
                raw = json.dumps(request.body).encode()  # otherwise the body is unchanged: forward the bytes
        elif isinstance(body, dict) and "steering" in body:
            err = SpecError("steering", "this server has no steering config (start it with steer-serve)")
            return await _send_json(send, 400, error_body(err))
        scope, replay = _with_body(scope, raw, receive)
        if request is None or (not request.ops and request.observe is None):
            return await self.app(scope, replay, send)
        responder = ResponseRewriter(self.service, request, send, stream=bool(request.body.get("stream")))
        try:
            await self.app(scope, replay, responder.send)
        finally:
            responder.close()

    async def _discovery(self, scope, send):
        if self.service is None:
            return await _send_json(
                send, 404, error_body(SpecError("steering", "no steering config", status=404))
            )
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

    async def _pull_worker_stats(self, scope) -> None:
        engine = getattr(scope["app"].state, "engine_client", None)
        if engine is None:
            return
        try:
            WORKER_STATS.update(await engine.collective_rpc("steer_plugin_stats", timeout=10))
        except Exception as err:  # metrics must never break serving
            logger.warning("steer_plugin: could not pull worker stats: %s", err)

    async def _call_app(self, scope, path: str, payload: dict) -> tuple[int, dict]:
        """Call the wrapped app in-process (no network) with a JSON POST."""
        body = json.dumps(payload).encode()
        sub = {
            **scope,
            "path": path,
            "raw_path": path.encode(),
            "method": "POST",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
        sent, status, chunks = False, 500, []
        done = asyncio.Event()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()  # like a client that stays connected until the response ends
            return {"type": "http.disconnect"}

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    done.set()

        await self._completion(sub, receive, send) if path in COMPLETION_PATHS else await self.app(
            sub, receive, send
        )
        return status, json.loads(b"".join(chunks) or b"{}")

    async def _inspect(self, scope, receive, send):
        """Text or chat messages in, top features of every token out: how a user finds the feature to steer."""
        try:
            if self.service is None:
                raise SpecError("steering", "this server has no steering config", status=404)
            try:
                req = json.loads(await _read_body(receive))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SpecError("body", "must be JSON") from None
            if not isinstance(req, dict):
                raise SpecError("body", "must be a JSON object")
            unknown = set(req) - {"model", "text", "messages", "saes", "top_k"}
            if unknown:
                raise SpecError(
                    sorted(unknown)[0], "unknown field; allowed: model, text, messages, saes, top_k"
                )
            if ("text" in req) == ("messages" in req):
                raise SpecError("text", "give exactly one of `text` or `messages`")
            tokenize = {"prompt": req["text"]} if "text" in req else {"messages": req["messages"]}
            if "model" in req:
                tokenize["model"] = req["model"]
            status, tokens = await self._call_app(scope, "/tokenize", {**tokenize, "return_token_strs": True})
            if status != 200:
                return await _send_json(send, status, json.dumps(tokens).encode())
            inspect = {
                "top_k": req.get("top_k", 5),
                "prompt": True,
                **({"saes": req["saes"]} if "saes" in req else {}),
            }
            completion = {
                "prompt": tokens["tokens"],
                "max_tokens": 1,
                "temperature": 0,
                "steering": {"inspect": inspect},
            }
            if "model" in req:
                completion["model"] = req["model"]
            status, result = await self._call_app(scope, "/v1/completions", completion)
            if status != 200:
                return await _send_json(send, status, json.dumps(result).encode())
        except SpecError as err:
            return await _send_json(send, err.status, error_body(err))
        features = result["choices"][0]["steering"].get("prompt_tokens", [])
        strs = tokens.get("token_strs") or [None] * len(tokens["tokens"])
        data = [
            {"position": i, "token_id": t, "token": s, "features": f}
            for i, (t, s, f) in enumerate(zip(tokens["tokens"], strs, features))
        ]
        return await _send_json(
            send, 200, json.dumps({"object": "list", "model": result.get("model"), "data": data}).encode()
        )

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
