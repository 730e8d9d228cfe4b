"""ASGI middleware for vLLM's OpenAI server (`--middleware steer_adapters.vllm.api.middleware.SteeringMiddleware`).

- POST /v1/chat/completions and /v1/completions: validates the `steering` field (400 naming the JSON path
  on error) and hands the resolved ops to vLLM in `vllm_xargs`; adds `steering` to each response choice.
- POST /v1/responses and /v1/messages (the other endpoints that build SamplingParams from `vllm_xargs`):
  `steering` operations apply; `inspect` is refused (their responses have no per-token slots).
- Every other POST: the plugin's reserved `vllm_xargs` keys are refused with a 400 (the engine drops any
  message not signed by this middleware anyway, see steer_plugin/signing.py).
- GET /v1/steering/saes, GET /v1/steering/features?sae=&q=[&index=], POST /v1/steering/inspect: discovery.
- GET /openapi.json: publishes the `steering` schema on both completion requests.
- GET /playground: the playground page (steer_plugin/playground).
- POST /v1/steering/saes|vectors, DELETE /v1/steering/saes|vectors/{id}: runtime loads (steer_plugin/admin.py),
  only when the config has `runtime` and an admin key is set; they need the X-Steer-Admin-Key header.

Every route obeys vLLM's own authentication (`--api-key`) exactly as vLLM's routes do, checked before
anything else; malformed bodies get a 400 in the OpenAI error shape, never a Python exception.
The config comes from STEER_PLUGIN_CONFIG (set by `steer-serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from urllib.parse import parse_qs, unquote

from steer_adapters.vllm import preflight
from steer_adapters.vllm.api import engine, sse
from steer_adapters.vllm.api.auth import AuthGate
from steer_adapters.vllm.api.compare import DEFAULT, STEERED, CompareMerger
from steer_plugin import playground
from steer_plugin.admin import ADMIN_KEY_HEADER, KINDS, LOAD_TIMEOUT_S, START_UP_ONLY_KEYS
from steer_plugin.body import parse_json, refuse_reserved_keys
from steer_plugin.config import SAESource, VectorSource, config_from_sources
from steer_plugin.messages import LoadCommand, LoadOutcome
from steer_plugin.metrics import (
    WORKER_STATS,
    initialize_series,
    register_worker_collector,
    with_worker_families,
)
from steer_plugin.observation import ObservationCost, check_request
from steer_plugin.request.schema import SpecError, SteeringSpec
from steer_plugin.request.wire import RESERVED_KEYS
from steer_plugin.service import STEERING_FIELD, RewrittenRequest, SteeringService, error_body

logger = logging.getLogger("steer_plugin")

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
STEERABLE_PATHS = ("/v1/responses", "/v1/messages")
REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest")
ADMIN_ROUTE = re.compile(r"/v1/steering/(saes|vectors)(?:/([^/]+))?")
HEALTH_PATHS = ("/health", "/ping")  # vLLM's, and SageMaker's name for it
MAX_LEN_UNKNOWN = 32768  # an observation's length bound before the engine says its max_model_len


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_body(
    send, status: int, body: bytes, content_type: bytes, *headers: tuple[bytes, bytes]
) -> None:
    length = str(len(body)).encode()
    start_headers = [(b"content-type", content_type), (b"content-length", length), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, body: bytes) -> None:
    await _send_body(send, status, body, b"application/json")


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


async def _rewrite_response(app, scope, receive, send, transform) -> None:
    """Run `app`, then send its 200 answer with `transform(body, content_type)` as the body (content-length
    fixed). The body is buffered, asked for uncompressed; other answers pass through unchanged."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
    start: dict | None = None
    chunks: list[bytes] = []

    async def buffered(message):
        nonlocal start
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                return await send(message)
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        response_headers = {k.lower(): v for k, v in start["headers"]}
        body = b"".join(chunks)
        if b"content-encoding" not in response_headers:
            body = transform(body, response_headers.get(b"content-type", b"").decode("latin-1"))
        out = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        out.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": out})
        await send({"type": "http.response.body", "body": body})

    await app({**scope, "headers": headers}, receive, buffered)


REQUEST_ID_HEADER = b"x-request-id"
RESPONSES_TURNS = 16  # /v1/responses may run several engine requests (tool turns) under one plan


def assign_request_id(scope: dict, body: dict) -> tuple[str, str | None]:
    """(the id vLLM will build the request's engine id from, a value for X-Request-Id to send it or None) —
    what a signed plan is bound to (request/wire.py Binding). vLLM takes the X-Request-Id header, else the
    body's `request_id` (only that on /v1/responses); when the client gave neither, a fresh id is chosen."""
    header = dict(scope["headers"]).get(REQUEST_ID_HEADER)
    given = body.get("request_id")
    if scope["path"] == "/v1/responses":
        if not isinstance(given, str):
            given = body["request_id"] = f"resp_{uuid.uuid4().hex}"
        return _bindable(given, "request_id"), None
    if header is not None:
        return _bindable(header.decode("latin-1"), "x-request-id"), None
    if isinstance(given, str) and scope["path"] in COMPLETION_PATHS:
        return _bindable(given, "request_id"), None
    fresh = uuid.uuid4().hex
    return fresh, fresh


def _bindable(request_id: str, field: str) -> str:
    if not 1 <= len(request_id) <= 256:
        raise SpecError(field, "a steered request's id must be 1 to 256 characters")
    return request_id


def with_request_id(scope: dict, request: RewrittenRequest | None) -> dict:
    """`scope` with the X-Request-Id header `request` was bound to, when the middleware chose it."""
    if request is None or request.request_id_header is None:
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != REQUEST_ID_HEADER]
    return {**scope, "headers": [*headers, (REQUEST_ID_HEADER, request.request_id_header.encode())]}


def json_as_vllm_reads_it(raw: bytes) -> object | None:
    """The body as vLLM's routes parse it (Starlette's `request.json()`: json.loads on the bytes, which reads
    UTF-8, UTF-16 and UTF-32), or None when it is not JSON."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (or JSON vLLM cannot read either)
        return None


def add_steering_to_openapi(doc: dict, admin: bool = False) -> dict:
    """vLLM's schema with `steering` on both completion requests (and the admin routes when they exist)."""
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
    if admin:
        _add_admin_paths(doc, schemas)
    return doc


def _add_admin_paths(doc: dict, schemas: dict) -> None:
    key = {"name": "X-Steer-Admin-Key", "in": "header", "required": True, "schema": {"type": "string"}}
    paths = doc.setdefault("paths", {})
    for segment, model in (("saes", SAESource), ("vectors", VectorSource)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        if model is SAESource:  # a runtime load takes a path; SAEs named by release are start-up only
            for name in START_UP_ONLY_KEYS:
                schema["properties"].pop(name, None)
            schema["required"] = sorted({*schema.get("required", []), "path"})
        schemas[model.__name__] = schema
        body = {"$ref": f"#/components/schemas/{model.__name__}"}
        paths[f"/v1/steering/{segment}"] = {
            "post": {
                "summary": f"Load one of {segment} into every worker (steer_plugin runtime loading)",
                "parameters": [key],
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    code: {"description": text}
                    for code, text in (
                        ("201", "Loaded: its description, with `revision`"),
                        ("400", "A bad field or file (`param` names it)"),
                        ("401", "Missing or wrong admin key"),
                        ("403", "A path outside runtime.roots, or a pickle not allowed"),
                        ("409", "The id is already loaded"),
                        ("507", "No room in the layer's reserved rows"),
                    )
                },
            }
        }
        paths[f"/v1/steering/{segment}/{{id}}"] = {
            "delete": {
                "summary": f"Unload one of {segment} loaded at runtime",
                "parameters": [
                    key,
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {
                    code: {"description": text}
                    for code, text in (
                        ("200", "Unloaded"),
                        ("401", "Missing or wrong admin key"),
                        ("404", "No such id"),
                        ("409", "In use by running requests, or configured at start-up"),
                    )
                },
            }
        }


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
        self.reported: set[int] = set()  # choice indices whose `applied` went out (first chunk of each)
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
        if self.stream:
            events, self.buffer = sse.split_events(self.buffer, message.get("body", b""))
            out = b"".join(self._rewrite_event(e) for e in events)
            if message.get("more_body") and not out:
                return
            return await self.downstream({**message, "body": out})
        self.buffer += message.get("body", b"")
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
            if self.request.traced:
                info["traced_features"] = self.observation.traced_features()
        if self.observation is not None and self.request.inspect is not None:
            reads = self.observation.next_tokens(count)
            info["tokens"] = [r.features for r in reads]
            if self.request.traced:
                info["traced"] = [r.traced for r in reads]
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            choice.pop("token_ids", None)
        if self.request.abort and choice.get("finish_reason") == "stop":
            abort = self.observation.abort()
            if abort is not None:  # the end-of-sequence token was forced by the worker (Steerer.force_aborts)
                choice["finish_reason"] = "abort_when"
                info["abort"] = abort
        return info

    def _rewrite_full(self, raw: bytes) -> bytes:
        data = json.loads(raw)
        if not isinstance(data, dict):  # vLLM answers `null` when the client went away before the end
            return raw
        self.response_id, self.model = data.get("id"), data.get("model")
        for choice in data.get("choices", []):
            count = len(choice.get("token_ids") or [])
            choice["steering"] = self._choice_steering(choice, count, first=True)
            if self.request.inspect is not None and self.request.inspect.prompt:
                reads = self.observation.prompt_tokens()
                choice["steering"]["prompt_tokens"] = [r.features for r in reads]
                choice["steering"]["prompt_sinks"] = sorted(self.observation.sinks)
                if self.request.traced:
                    choice["steering"]["prompt_traced"] = [r.traced for r in reads]
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            data.pop("prompt_token_ids", None)
        return json.dumps(data).encode()

    def _rewrite_event(self, event: bytes) -> bytes:
        data = sse.event_json(event)
        if not isinstance(data, dict):
            return event + sse.SEPARATOR
        self.response_id, self.model = data.get("id", self.response_id), data.get("model", self.model)
        for choice in data.get("choices", []):
            count = len(choice.get("token_ids") or [])
            index = choice.get("index", 0)
            choice["steering"] = self._choice_steering(choice, count, first=index not in self.reported)
            self.reported.add(index)
        if not self.request.user_wants_token_ids and self.request.observe is not None:
            data.pop("prompt_token_ids", None)
        return sse.data_event(data)

    def close(self) -> None:
        if not self.closed and self.observation is not None:
            self.closed = True
            self.observation.finish(self.response_id, self.model)


class _ResponseState:
    """Wraps `send` to know whether a response has started (an error can then no longer be sent)."""

    def __init__(self, send):
        self.downstream = send
        self.started = False

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.started = True
        await self.downstream(message)


class SteeringMiddleware:
    def __init__(self, app):
        preflight.check("api")  # refuses to build the app, naming what moved, on a vLLM we do not fit
        self.app = app
        config = config_from_sources(None)
        self.service = SteeringService(config) if config is not None else None
        self._auth = AuthGate()
        self._warned_extension = False
        if self.service is None:
            logger.warning(
                "steer_plugin middleware: STEER_PLUGIN_CONFIG is not set; `steering` fields get a 400"
            )
        else:
            register_worker_collector()
            initialize_series(config)
            logger.info("steer_plugin middleware: serving SAEs %s", sorted(self.service.catalog.saes))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.service is not None and self.service.model_layers is None:
            shape = engine.model_shape(getattr(scope.get("app"), "state", None))
            if shape is not None:
                self.service.set_model_shape(*shape)
        handler = self._handler(scope)
        if handler is None:
            return await self.app(scope, receive, send)
        state = _ResponseState(send)
        try:
            await self._auth.wrap(scope.get("app"), handler)(scope, receive, state.send)
        except SpecError as err:
            if state.started:
                raise
            await _send_json(send, err.status, error_body(err))
        except Exception:
            if state.started:
                raise
            logger.exception("steer_plugin middleware: internal error on %s", scope["path"])
            err = SpecError("", "internal error in the steering plugin", status=500)
            await _send_json(send, 500, error_body(err))

    def _handler(self, scope):
        """The handler of a request the plugin must see, or None to pass it straight to vLLM."""
        path, method = scope["path"], scope["method"]
        admin = self.service.admin if self.service is not None else None
        if admin is not None and ADMIN_ROUTE.fullmatch(path) and method in ("POST", "DELETE"):
            return self._admin
        if method == "POST":
            if path in COMPLETION_PATHS:
                return self._completion
            if path in STEERABLE_PATHS:
                return self._steerable
            if path == "/v1/steering/inspect":
                return self._inspect
            return self._guard_reserved
        if method == "GET":
            if path in HEALTH_PATHS and self.service is not None:
                return self._health
            if path.startswith("/v1/steering/"):
                return self._discovery
            if path.rstrip("/") == playground.ROUTE:
                return self._playground
            if path.rstrip("/") == "/metrics" and self.service is not None:
                return self._metrics
            if path == "/openapi.json":
                return self._openapi
        return None

    def _rewrite(self, raw: bytes, observable: bool, scope: dict) -> tuple[bytes, RewrittenRequest | None]:
        """(body for vLLM, rewritten request or None when nothing is steered or observed); SpecError on a bad
        body. An unsteered, unobserved body is forwarded as the client sent it."""
        body = parse_json(raw)
        if not isinstance(body, dict):
            return raw, None  # vLLM answers that itself
        if self.service is None:
            refuse_reserved_keys(body)
            if STEERING_FIELD in body:
                raise SpecError(
                    STEERING_FIELD, "this server has no steering config (start it with steer-serve)"
                )
            return raw, None
        had_steering = STEERING_FIELD in body
        request_id, header = assign_request_id(scope, body)
        turns = RESPONSES_TURNS if scope["path"] == "/v1/responses" else 1
        request = self.service.rewrite_request(
            body, observable=observable, request_id=request_id, turns=turns
        )
        if not (had_steering or request.ops or request.observe is not None):
            return raw, None
        return json.dumps(request.body).encode(), request._replace(request_id_header=header)

    async def _completion(self, scope, receive, send):
        raw = await _read_body(receive)
        body, request = self._rewrite(raw, observable=True, scope=scope)
        # From resolution to the response's end, the SAEs and vectors it names count as in use (no await
        # between the two: a runtime unload sees either the request or a catalog without the source).
        with self.service.holding(request) if request is not None else contextlib.nullcontext():
            cost = await self._observation_cost(scope, request)
            # An observing request runs only with room under policy.observation (it may wait; plain ones never).
            async with (
                self.service.observation_budget.hold(cost) if cost is not None else contextlib.nullcontext()
            ):
                if request is not None and request.compare:
                    return await self._compare(scope, receive, send, body, request)
                await self._serve(scope, body, request, receive, send)

    async def _observation_cost(self, scope, request: RewrittenRequest | None) -> ObservationCost | None:
        """The full cost of what the request observes (steer_plugin/observation.py), its prompt tokens counted
        when it observes them; a 403 naming the field when one request is over the policy's bounds."""
        if request is None or request.cost is None:
            return None
        cost = request.cost
        max_len = engine.max_model_len(scope["app"].state) or MAX_LEN_UNKNOWN
        if request.inspect is not None and request.inspect.prompt:
            cost = cost._replace(prompt_tokens=await self._prompt_tokens(scope, request.body, max_len))
        if not cost.generated_tokens:  # no max_tokens: what the model may still generate
            cost = cost._replace(generated_tokens=max(1, max_len - cost.prompt_tokens))
        if request.compare:  # both variants observe
            cost = cost._replace(
                prompt_tokens=2 * cost.prompt_tokens, generated_tokens=2 * cost.generated_tokens
            )
        check_request(cost, self.service.config.policy.observation)
        return cost

    async def _prompt_tokens(self, scope, body: dict, max_len: int) -> int:
        """How many tokens the request's prompt has (token ids are counted; text and chat messages are
        tokenized by vLLM's own /tokenize, in-process); `max_len` when vLLM cannot say."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        keys = ("model", "add_special_tokens", "add_generation_prompt", "continue_final_message")
        keys += ("chat_template", "chat_template_kwargs", "tools")
        payload = {k: body[k] for k in keys if k in body}
        if "messages" in body:
            payload["messages"] = body["messages"]
        elif isinstance(prompt, str):
            payload["prompt"] = prompt
        else:
            return max_len
        status, answer = await self._call_app(scope, "/tokenize", payload)
        count = answer.get("count") if status == 200 else None
        return count if isinstance(count, int) else max_len

    async def _serve(self, scope, body: bytes, request: RewrittenRequest | None, receive_client, send):
        """`body` through vLLM; its answer rewritten (per-token features, applied ops) when steered/observed."""
        scope, replay = _with_body(with_request_id(scope, request), body, receive_client)
        if request is None or (not request.ops and request.observe is None):
            return await self.app(scope, replay, send)
        responder = ResponseRewriter(self.service, request, send, stream=bool(request.body.get("stream")))
        try:
            await self.app(scope, replay, responder.send)
        finally:
            responder.close()

    async def _compare(self, scope, receive, send, body: bytes, steered: RewrittenRequest):
        """`steering.compare`: the steered and the default variant run as two requests at once, merged into
        one answer (api/compare.py). A client disconnect reaches both."""
        request_id, header = assign_request_id(scope, steered.body)
        default = self.service.default_variant(steered, request_id)._replace(request_id_header=header)
        merger = CompareMerger(send, stream=bool(steered.body.get("stream")), n=steered.endpoint.choices)
        disconnected = asyncio.Event()

        async def watch_client():
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        async def until_disconnect():
            await disconnected.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.create_task(watch_client())
        variants = [
            asyncio.create_task(self._serve(scope, body, steered, until_disconnect, merger.sender(STEERED))),
            asyncio.create_task(
                self._serve(
                    scope,
                    json.dumps(default.body).encode(),
                    default,
                    until_disconnect,
                    merger.sender(DEFAULT),
                )
            ),
        ]
        try:
            await asyncio.gather(*variants)
            await merger.finish()
        finally:
            for task in (*variants, watcher):
                task.cancel()

    async def _steerable(self, scope, receive, send):
        """/v1/responses, /v1/messages: steering applies; responses are passed through unchanged."""
        raw, request = self._rewrite(await _read_body(receive), observable=False, scope=scope)
        scope, replay = _with_body(with_request_id(scope, request), raw, receive)
        with self.service.holding(request) if request is not None else contextlib.nullcontext():
            return await self.app(scope, replay, send)

    async def _guard_reserved(self, scope, receive, send):
        """Any other POST (/v1/chat/completions/batch, /invocations, /tokenize, ...): a body that names the
        plugin's reserved keys is refused (the engine would drop the forged message anyway), and so is a
        `steering` field, which these endpoints would silently ignore; everything else reaches vLLM untouched.
        The body is read the way vLLM reads it, whatever its content type: JSON in UTF-8, -16 or -32 (what
        json.loads detects from the bytes), so no encoding or escape hides a key from the check."""
        raw = await _read_body(receive)
        data = json_as_vllm_reads_it(raw)
        if data is None:  # not JSON (a multipart upload, a form): the raw bytes are all there is to test
            if any(key.encode() in raw for key in RESERVED_KEYS):
                raise SpecError(
                    "vllm_xargs", "keys starting with `steer_plugin` are reserved for the steering plugin"
                )
        else:
            refuse_reserved_keys(data)
            if isinstance(data, dict) and STEERING_FIELD in data:
                raise SpecError(
                    STEERING_FIELD,
                    f"{scope['path']} does not apply steering; it is served on "
                    f"{', '.join(COMPLETION_PATHS + STEERABLE_PATHS)}",
                )
        scope, replay = _with_body(scope, raw, receive)
        return await self.app(scope, replay, send)

    async def _discovery(self, scope, receive, send):
        if self.service is None:
            raise SpecError("steering", "no steering config", status=404)
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        if scope["path"] == "/v1/steering/saes":
            result = self.service.discovery.list_saes()
        elif scope["path"] == "/v1/steering/features":
            limit = query.get("limit", "20")
            if not re.fullmatch(r"[0-9]{1,7}", limit):
                raise SpecError("limit", "must be an integer")
            index = query.get("index")
            if index is not None and not re.fullmatch(r"[0-9]{1,9}", index):
                raise SpecError("index", "must be a non-negative integer")
            result = self.service.discovery.search_features(
                query.get("sae"), query.get("q"), int(limit), int(index) if index is not None else None
            )
        else:
            raise SpecError("path", f"unknown steering endpoint {scope['path']}", status=404)
        return await _send_json(send, 200, json.dumps(result).encode())

    async def _admin(self, scope, receive, send):
        """Runtime load (POST /v1/steering/saes|vectors, the source in the body) and unload (DELETE
        /v1/steering/saes|vectors/{id}); see steer_plugin/admin.py."""
        admin = self.service.admin
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
                raise SpecError("path", "POST to /v1/steering/saes or /v1/steering/vectors", status=404)
            body = parse_json(await _read_body(receive))
            result = await admin.load(kind, body, broadcast)
            return await _send_json(send, 201, json.dumps(result).encode())
        if source_id is None:
            raise SpecError("path", "DELETE /v1/steering/saes/{id} or /v1/steering/vectors/{id}", status=404)
        result = await admin.unload(kind, unquote(source_id), broadcast)
        return await _send_json(send, 200, json.dumps(result).encode())

    async def _playground(self, scope, receive, send):
        """The static playground page. It holds no data: every call it makes goes through the API (and its
        key), so it is served like /health, outside vLLM's /v1 authentication."""
        if self.service is None:
            raise SpecError("steering", "this server has no steering config", status=404)
        await _send_body(
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

    async def _health(self, scope, receive, send):
        """vLLM's /health answers 200 while its engine core process is alive, even when it is stuck (in a step,
        or in a worker call that never returns): then no request progresses. The engine core is asked for a
        reply first (engine.EngineProbe); no reply within `health_timeout_s` is a 503 naming the wait."""
        probe = engine.EngineProbe.of(scope["app"].state)
        if probe is not None:
            timeout = self.service.config.health_timeout_s
            if not await probe.answers(timeout):
                message = f"the engine has not answered for {timeout:g} s: it is stalled"
                return await _send_json(send, 503, error_body(SpecError("engine", message, 503)))
        return await self.app(scope, receive, send)

    async def _metrics(self, scope, receive, send):
        await self._pull_worker_stats(scope)
        # With PROMETHEUS_MULTIPROC_DIR (vLLM sets it for --api-server-count > 1) vLLM answers from a registry
        # that holds only the multiprocess files: the worker collector's families are added back here.
        return await _rewrite_response(self.app, scope, receive, send, with_worker_families)

    async def _pull_worker_stats(self, scope) -> None:
        workers = engine.EngineWorkers.of(scope["app"].state)
        if workers is None:
            return
        if not workers.have_extension:
            if not self._warned_extension:
                self._warned_extension = True
                logger.warning("steer_plugin: /metrics has no worker figures: %s", engine.MISSING_EXTENSION)
            return
        try:
            WORKER_STATS.update(await workers.stats(timeout=10))
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
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k, v) for k, v in scope["headers"] if k.lower() == b"authorization"),
            ],
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

        try:
            if path in COMPLETION_PATHS:
                await self._completion(sub, receive, send)
            else:
                await self.app(sub, receive, send)
        except SpecError as err:
            return err.status, json.loads(error_body(err))
        return status, json.loads(b"".join(chunks) or b"{}")

    async def _inspect(self, scope, receive, send):
        """Text or chat messages in, top features of every token out: how a user finds the feature to steer."""
        try:
            if self.service is None:
                raise SpecError("steering", "this server has no steering config", status=404)
            req = parse_json(await _read_body(receive))
            if not isinstance(req, dict):
                raise SpecError("body", "must be a JSON object")
            allowed = ("model", "text", "messages", "saes", "top_k", "features")
            unknown = set(req) - set(allowed)
            if unknown:
                raise SpecError(sorted(unknown)[0], f"unknown field; allowed: {', '.join(allowed)}")
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
                **{key: req[key] for key in ("saes", "features") if key in req},
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
        return await _send_json(send, 200, json.dumps(out).encode())

    async def _openapi(self, scope, receive, send):
        await _rewrite_response(
            self.app,
            scope,
            receive,
            send,
            lambda body, _: json.dumps(
                add_steering_to_openapi(
                    json.loads(body), admin=self.service is not None and self.service.admin is not None
                )
            ).encode(),
        )
