"""The plugin's own routes, on Starlette routing: discovery (GET /v1/steering/saes, /v1/steering/features),
POST /v1/steering/inspect, the playground page and, when the config allows runtime loads, the admin routes
(POST /v1/steering/saes|vectors, DELETE /v1/steering/saes|vectors/{id}).

`PluginRoutes.match` gives the middleware the route of a request it must answer itself, or None (the request goes
to vLLM untouched); the middleware applies vLLM's authentication around it and answers a SpecError in the OpenAI
error shape. Each documented route carries a `Doc` from which api/openapi.py writes its /openapi.json entry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Router

from steer_adapters.vllm.api import engine, fit_routes
from steer_adapters.vllm.api.asgi import read_body
from steer_adapters.vllm.api.route_models import (
    FeatureList,
    FeatureSearchQuery,
    InspectRequest,
    InspectResponse,
    ProbeInfo,
    SAEInfo,
    SAEList,
    Unloaded,
    VectorInfo,
    validated,
)
from steer_adapters.vllm.api.routing import KIND, Doc, JSONAnswer, PluginRoute, matching_route
from steer_plugin import playground
from steer_plugin.admin import ADMIN_KEY_HEADER, KINDS
from steer_plugin.body import parse_json
from steer_plugin.config import ProbeSource, SAESource, VectorSource
from steer_plugin.fitting.bodies import FitProbeBody, FitVectorBody
from steer_plugin.request.schema import SpecError
from steer_plugin.service import SteeringService

# The wrapped app called in-process with a JSON POST: (status, JSON answer).
CallApp = Callable[[dict, str, dict], Awaitable[tuple[int, dict]]]


def _no_config(message: str = "this server has no steering config") -> SpecError:
    return SpecError("steering", message, status=404)


class Endpoints:
    """The routes' handlers for one API process: `request` in, Starlette response out, SpecError on refusal."""

    def __init__(self, service: SteeringService | None, call_app: CallApp | None):
        self.service = service
        self.call_app = call_app

    # --- discovery (steer_plugin/discovery.py) ------------------------------------------------------------

    def _discovery(self):
        if self.service is None:
            raise _no_config("no steering config")
        return self.service.discovery

    async def _current_discovery(self, request: Request):
        """The discovery snapshot, after the catalog caught up with other API processes' loads and unloads."""
        self._discovery()
        await self.service.current(engine.load_link(getattr(request.scope.get("app"), "state", None)))
        return self._discovery()

    async def saes(self, request: Request) -> Response:
        return JSONAnswer((await self._current_discovery(request)).list_saes())

    async def features(self, request: Request) -> Response:
        discovery = await self._current_discovery(request)
        given = {k: v for k, v in request.query_params.multi_items() if v}  # a blank value is no value
        query = validated(FeatureSearchQuery, given)
        return JSONAnswer(discovery.search_features(query.sae, query.q, query.limit, query.index))

    async def unknown(self, request: Request) -> Response:
        self._discovery()
        raise SpecError("path", f"unknown steering endpoint {request.scope['path']}", status=404)

    # --- inspect ------------------------------------------------------------------------------------------

    async def inspect(self, request: Request) -> Response:
        """Text or chat messages in, top features of every token out: how a user finds the feature to steer.
        The text goes through vLLM's /tokenize, its tokens through /v1/completions with `steering.inspect`."""
        if self.service is None:
            raise _no_config()
        body = parse_json(await read_body(request.receive))
        given = validated(InspectRequest, body, InspectRequest.param_prefix).model_dump(
            mode="json", exclude_unset=True
        )
        tokenize = {"prompt": given["text"]} if "text" in given else {"messages": given["messages"]}
        model = {"model": given["model"]} if "model" in given else {}
        scope = request.scope
        status, tokens = await self.call_app(
            scope, "/tokenize", {**tokenize, **model, "return_token_strs": True}
        )
        if status != 200:
            return JSONAnswer(tokens, status)
        inspect = {"top_k": given.get("top_k", 5), "prompt": True}
        inspect |= {key: given[key] for key in ("saes", "features", "probes") if key in given}
        completion = {"prompt": tokens["tokens"], "max_tokens": 1, "temperature": 0, **model}
        status, result = await self.call_app(
            scope, "/v1/completions", {**completion, "steering": {"inspect": inspect}}
        )
        if status != 200:
            return JSONAnswer(result, status)
        return JSONAnswer(_per_token(tokens, result))

    # --- the playground -----------------------------------------------------------------------------------

    async def playground(self, request: Request) -> Response:
        """The static playground page. It holds no data: every call it makes goes through the API (and its
        key), so it is served like /health, outside vLLM's /v1 authentication."""
        if self.service is None:
            raise _no_config()
        headers = {
            "cache-control": "no-cache",
            "x-content-type-options": "nosniff",
            "content-security-policy": playground.content_security_policy().decode("latin-1"),
            "x-frame-options": "DENY",  # frame-ancestors for browsers without CSP level 2
            "referrer-policy": "no-referrer",
        }
        return Response(playground.page(), 200, headers, media_type="text/html; charset=utf-8")

    # --- runtime loads (steer_plugin/admin.py) ------------------------------------------------------------

    def _workers(self, request: Request) -> engine.EngineWorkers:
        """The engine's workers, once the admin key is checked and runtime loads can run here."""
        self.service.admin.check_key(dict(request.scope["headers"]).get(ADMIN_KEY_HEADER))
        return engine.ready_workers(request.scope["app"].state)

    async def load(self, request: Request) -> Response:
        workers = self._workers(request)
        body = parse_json(await read_body(request.receive))
        kind = KINDS[request.path_params["kind"]]
        return JSONAnswer(await self.service.admin.load(kind, body, workers.broadcast), 201)

    async def unload(self, request: Request) -> Response:
        workers = self._workers(request)
        kind, source_id = KINDS[request.path_params["kind"]], unquote(request.path_params["id"])
        return JSONAnswer(await self.service.admin.unload(kind, source_id, workers.broadcast))

    async def misrouted(self, request: Request) -> Response:
        """POST to an id, DELETE without one: refused after the same checks as the routes themselves."""
        self._workers(request)
        if request.method == "POST":
            raise SpecError("path", "POST to /v1/steering/saes, /vectors or /probes", status=404)
        raise SpecError("path", "DELETE /v1/steering/saes|vectors|probes/{id}", status=404)

    async def fit(self, request: Request) -> Response:
        """POST /v1/steering/probes:fit and /v1/steering/vectors:fit (api/fit_routes.py)."""
        return JSONAnswer(
            await fit_routes.fit(self.service, self.call_app, self._workers(request), request), 201
        )


def _per_token(tokens: dict, result: dict) -> dict:
    """The inspect answer: one item per prompt token, from /tokenize's tokens and the completion's steering."""
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
    return out


LOAD = Doc(
    "Load one of {kind} into every worker (steer_plugin runtime loading)",
    {
        201: "Loaded: its description, with `revision`",
        400: "A bad field or file (`param` names it)",
        401: "Missing or wrong admin key",
        403: "A path outside runtime.roots, or a pickle not allowed",
        409: "The id is already loaded",
        507: "No room in the layer's reserved rows",
    },
    body={"saes": SAESource, "vectors": VectorSource, "probes": ProbeSource},
    answer={"saes": SAEInfo, "vectors": VectorInfo, "probes": ProbeInfo},
    admin_key=True,
)
UNLOAD = Doc(
    "Unload one of {kind} loaded at runtime",
    {
        200: "Unloaded",
        401: "Missing or wrong admin key",
        404: "No such id",
        409: "In use by running requests, or configured at start-up",
    },
    answer=Unloaded,
    admin_key=True,
)
FIT_ERRORS = {
    400: "A bad field or example (`param` names it)",
    401: "Missing or wrong admin key",
    409: "The id is already loaded, or `save_to` exists",
    507: "No room in the layer's reserved rows",
}
FIT_PROBE = Doc(
    "Fit a probe from labelled texts (logistic regression on pooled residuals) and load it",
    {201: "The probe loaded: held-out AUROC and accuracy, where it was saved", **FIT_ERRORS},
    body=FitProbeBody,
    admin_key=True,
)
FIT_VECTOR = Doc(
    "Fit a steering vector from contrastive pairs (difference of means, unit norm) and load it",
    {201: "The vector loaded, where it was saved", **FIT_ERRORS},
    body=FitVectorBody,
    admin_key=True,
)
SAES = Doc("The loaded SAEs requests may read, the vectors and the probes", {200: "The list"}, answer=SAEList)
FEATURES = Doc(
    "Search features by label and explanation, or one feature by index",
    {
        200: "The best matches first",
        400: "A bad parameter (`param` names it)",
        403: "An SAE requests may not read",
        404: "No such SAE or feature",
    },
    query=FeatureSearchQuery,
    answer=FeatureList,
)
INSPECT = Doc(
    "The top features of every token of a text or chat messages",
    {
        200: "One item per token",
        400: "A bad field (`param` names it, as the completion's `steering.inspect` would)",
        403: "An SAE requests may not read",
    },
    body=InspectRequest,
    answer=InspectResponse,
)


def plugin_router(endpoints: Endpoints, admin: bool) -> Router:
    """The routes, first match wins; the admin routes only when runtime loads are configured."""
    e = endpoints
    routes = []
    if admin:
        routes += [
            PluginRoute("/v1/steering/probes:fit", e.fit, "POST", FIT_PROBE),
            PluginRoute("/v1/steering/vectors:fit", e.fit, "POST", FIT_VECTOR),
            PluginRoute(f"/v1/steering/{KIND}", e.load, "POST", LOAD),
            PluginRoute(f"/v1/steering/{KIND}/{{id}}", e.unload, "DELETE", UNLOAD),
            PluginRoute(f"/v1/steering/{KIND}", e.misrouted, "DELETE"),
            PluginRoute(f"/v1/steering/{KIND}/{{id}}", e.misrouted, "POST"),
        ]
    routes += [
        PluginRoute("/v1/steering/saes", e.saes, "GET", SAES),
        PluginRoute("/v1/steering/features", e.features, "GET", FEATURES),
        PluginRoute("/v1/steering/{rest:path}", e.unknown, "GET"),
        PluginRoute("/v1/steering/inspect", e.inspect, "POST", INSPECT),
        PluginRoute(f"{playground.ROUTE}{{slashes:steer_slashes}}", e.playground, "GET"),
    ]
    return Router(routes=routes)


def documented_routes(admin: bool) -> list[PluginRoute]:
    """The routes /openapi.json documents (the handlers are not called)."""
    return [r for r in plugin_router(Endpoints(None, None), admin).routes if r.include_in_schema]


class PluginRoutes:
    """The plugin's routes in one API process."""

    def __init__(self, service: SteeringService | None, call_app: CallApp):
        admin = service is not None and service.admin is not None
        self.endpoints = Endpoints(service, call_app)
        self.router = plugin_router(self.endpoints, admin)

    def match(self, scope: dict):
        """The ASGI handler of the route that answers `scope` (its exact path and method), or None."""
        return matching_route(self.router, scope)
