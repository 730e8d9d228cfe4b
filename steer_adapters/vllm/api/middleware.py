"""ASGI middleware for vLLM's OpenAI server (`--middleware steer_adapters.vllm.api.middleware.SteeringMiddleware`).

- POST /v1/chat/completions and /v1/completions: validates the `steering` field (400 naming the JSON path
  on error) and hands the resolved ops to vLLM in `vllm_xargs`; adds `steering` to each response choice.
- POST /v1/responses and /v1/messages (the other endpoints that build SamplingParams from `vllm_xargs`):
  `steering` operations apply; `inspect` is refused (their responses have no per-token slots).
- Every other POST: the plugin's reserved `vllm_xargs` keys are refused with a 400 (the engine drops any
  message not signed by this middleware anyway, see steer_plugin/signing.py).
- The plugin's own routes (api/routes.py, on Starlette routing): GET /v1/steering/saes,
  GET /v1/steering/features?sae=&q=[&index=], POST /v1/steering/inspect, GET /playground, the runtime loads
  POST /v1/steering/saes|vectors|probes, DELETE /v1/steering/saes|vectors|probes/{id} (steer_plugin/admin.py) and
  the fits POST /v1/steering/probes:fit and /v1/steering/vectors:fit (steer_plugin/fitting), these only when
  the config has `runtime` and an admin key is set; they need the X-Steer-Admin-Key header.
- GET /openapi.json: publishes the `steering` schema on both completion requests and the plugin's routes.

Every route obeys vLLM's own authentication (`--api-key`) exactly as vLLM's routes do, checked before
anything else; malformed bodies get a 400 in the OpenAI error shape, never a Python exception.
The config comes from STEER_PLUGIN_CONFIG (set by `steer-serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from steer_adapters.vllm import preflight
from steer_adapters.vllm.api import engine
from steer_adapters.vllm.api.asgi import (
    ResponseState,
    json_as_vllm_reads_it,
    read_body,
    rewrite_response,
    send_json,
    until_stopped,
    with_body,
)
from steer_adapters.vllm.api.auth import AuthGate
from steer_adapters.vllm.api.compare import DEFAULT, STEERED, CompareMerger
from steer_adapters.vllm.api.openapi import add_steering_to_openapi
from steer_adapters.vllm.api.request_ids import (
    COMPLETION_PATHS,
    REQUEST_ID_HEADER,
    RESPONSES_TURNS,
    assign_request_id,
    with_request_id,
)
from steer_adapters.vllm.api.rewriter import ResponseRewriter
from steer_adapters.vllm.api.routes import PluginRoutes
from steer_plugin.body import parse_json, refuse_reserved_keys
from steer_plugin.config import config_from_sources
from steer_plugin.metrics import (
    WORKER_STATS,
    initialize_series,
    register_worker_collector,
    with_worker_families,
)
from steer_plugin.monitor import inbox as observe_inbox
from steer_plugin.monitor.judge import JUDGE_HEADER
from steer_plugin.observation import ObservationCost, check_request
from steer_plugin.request.schema import SpecError
from steer_plugin.request.wire import RESERVED_KEYS
from steer_plugin.service import STEERING_FIELD, RewrittenRequest, SteeringService, error_body

logger = logging.getLogger("steer_plugin")

STEERABLE_PATHS = ("/v1/responses", "/v1/messages")
HEALTH_PATHS = ("/health", "/ping")  # vLLM's, and SageMaker's name for it
MAX_LEN_UNKNOWN = 32768  # an observation's length bound before the engine says its max_model_len


class SteeringMiddleware:
    def __init__(self, app):
        preflight.check("api")  # refuses to build the app, naming what moved, on a vLLM we do not fit
        self.app = app
        config = config_from_sources(None)
        self.service = SteeringService(config) if config is not None else None
        self._auth = AuthGate()
        self.routes = PluginRoutes(self.service, self._call_app)
        self._warned_extension = False
        if self.service is None:
            logger.warning(
                "steer_plugin middleware: STEER_PLUGIN_CONFIG is not set; `steering` fields get a 400"
            )
        else:
            register_worker_collector()
            initialize_series(config, {pid: p.labels for pid, p in self.service.catalog.probes.items()})
            logger.info("steer_plugin middleware: serving SAEs %s", sorted(self.service.catalog.saes))
            logger.info("steer_plugin middleware: observation inbox %s", observe_inbox.inbox().address)

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
        state = ResponseState(send)
        try:
            await self._auth.wrap(scope.get("app"), handler)(scope, receive, state.send)
        except SpecError as err:
            if state.started:
                raise
            await send_json(send, err.status, error_body(err))
        except Exception:
            if state.started:
                raise
            logger.exception("steer_plugin middleware: internal error on %s", scope["path"])
            err = SpecError("", "internal error in the steering plugin", status=500)
            await send_json(send, 500, error_body(err))

    def _handler(self, scope):
        """The handler of a request the plugin must see, or None to pass it straight to vLLM."""
        path, method = scope["path"], scope["method"]
        if method == "POST" and path in COMPLETION_PATHS:
            return self._completion  # first: no route of the plugin's own is a completion path
        route = self.routes.match(scope)
        if route is not None:
            return route
        if method == "POST":
            if path in STEERABLE_PATHS:
                return self._steerable
            return self._guard_reserved
        if method == "GET":
            if path in HEALTH_PATHS and self.service is not None:
                return self._health
            if path.rstrip("/") == "/metrics" and self.service is not None:
                return self._metrics
            if path == "/openapi.json":
                return self._openapi
        return None

    async def _rewrite(
        self, raw: bytes, observable: bool, scope: dict
    ) -> tuple[bytes, RewrittenRequest | None]:
        """(body for vLLM, rewritten request or None when nothing is steered or observed); SpecError on a bad
        body. An unsteered, unobserved body is forwarded as the client sent it. With several API processes the
        catalog is read again first when the request needs it (service.rewrite_current)."""
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
        link = engine.load_link(getattr(scope.get("app"), "state", None))
        request = await self.service.rewrite_current(
            body, link, observable=observable, request_id=request_id, turns=turns
        )
        if not (had_steering or request.ops or request.observe is not None):
            return raw, None
        return json.dumps(request.body).encode(), request._replace(request_id_header=header)

    async def _completion(self, scope, receive, send):
        raw = await read_body(receive)
        body, request = await self._rewrite(raw, observable=True, scope=scope)
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
        scope, replay = with_body(with_request_id(scope, request), body, receive_client)
        if request is None or (not request.ops and request.observe is None):
            return await self.app(scope, replay, send)
        judge_token = dict(scope["headers"]).get(JUDGE_HEADER.encode(), b"").decode("latin-1") or None
        responder = ResponseRewriter(
            self.service, request, send, stream=bool(request.body.get("stream")), judge_token=judge_token
        )
        if responder.cascade is not None:  # a positive verdict ends the answer as a client disconnect would
            replay = until_stopped(replay, responder.cascade.stop)
        try:
            await self.app(scope, replay, responder.send)
            await responder.finish_judged()
        finally:
            try:
                await responder.settle_end()
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
        raw, request = await self._rewrite(await read_body(receive), observable=False, scope=scope)
        scope, replay = with_body(with_request_id(scope, request), raw, receive)
        with self.service.holding(request) if request is not None else contextlib.nullcontext():
            return await self.app(scope, replay, send)

    async def _guard_reserved(self, scope, receive, send):
        """Any other POST (/v1/chat/completions/batch, /invocations, /tokenize, ...): a body that names the
        plugin's reserved keys is refused (the engine would drop the forged message anyway), and so is a
        `steering` field, which these endpoints would silently ignore; everything else reaches vLLM untouched.
        The body is read the way vLLM reads it, whatever its content type: JSON in UTF-8, -16 or -32 (what
        json.loads detects from the bytes), so no encoding or escape hides a key from the check."""
        raw = await read_body(receive)
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
        scope, replay = with_body(scope, raw, receive)
        return await self.app(scope, replay, send)

    async def _health(self, scope, receive, send):
        """vLLM's /health answers 200 while its engine core process is alive, even when it is stuck (in a step,
        or in a worker call that never returns): then no request progresses. The engine core is asked for a
        reply first (engine.EngineProbe); no reply within `health_timeout_s` is a 503 naming the wait."""
        probe = engine.EngineProbe.of(scope["app"].state)
        if probe is not None:
            timeout = self.service.config.health_timeout_s
            if not await probe.answers(timeout):
                message = f"the engine has not answered for {timeout:g} s: it is stalled"
                return await send_json(send, 503, error_body(SpecError("engine", message, 503)))
        return await self.app(scope, receive, send)

    async def _metrics(self, scope, receive, send):
        await self._pull_worker_stats(scope)
        # With PROMETHEUS_MULTIPROC_DIR (vLLM sets it for --api-server-count > 1) vLLM answers from a registry
        # that holds only the multiprocess files: the worker collector's families are added back here.
        return await rewrite_response(self.app, scope, receive, send, with_worker_families)

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

    async def _call_app(
        self, scope, path: str, payload: dict, request_id: str | None = None
    ) -> tuple[int, dict]:
        """Call the wrapped app in-process (no network) with a JSON POST. With `request_id` (a fit's residual
        read: its body carries a plan the plugin signed, bound to that id) it goes to vLLM as is, under that
        X-Request-Id."""
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
                *([(REQUEST_ID_HEADER, request_id.encode())] if request_id is not None else []),
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
            if path in COMPLETION_PATHS and request_id is None:
                await self._completion(sub, receive, send)
            else:
                await self.app(sub, receive, send)
        except SpecError as err:
            return err.status, json.loads(error_body(err))
        return status, json.loads(b"".join(chunks) or b"{}")

    async def _openapi(self, scope, receive, send):
        await rewrite_response(
            self.app,
            scope,
            receive,
            send,
            lambda body, _: json.dumps(
                add_steering_to_openapi(
                    json.loads(body),
                    admin=self.service is not None and self.service.admin is not None,
                    routes=self.service is not None,
                )
            ).encode(),
        )
