"""POST /v1/steering/probes:fit and /v1/steering/vectors:fit: the admin's fits from examples
(steer_plugin/fitting), behind the admin key like runtime loads (routes.py checks it). The texts are tokenized by vLLM's own
/tokenize and read through vLLM's /v1/completions, both called in-process; a residual read goes to the wrapped
app directly (it carries a plan the plugin signed, so the plugin's own request checks are skipped)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from steer_adapters.vllm.api import engine
from steer_adapters.vllm.api.asgi import read_body
from steer_plugin.body import parse_json
from steer_plugin.fitting.run import Engine
from steer_plugin.request.schema import SpecError
from steer_plugin.service import SteeringService

FIT_PATHS = {"/v1/steering/probes:fit": "probe", "/v1/steering/vectors:fit": "vector"}

# The wrapped app called in-process with a JSON POST (a request id: straight to vLLM, under that id).
CallApp = Callable[..., Awaitable[tuple[int, dict]]]


async def fit(service: SteeringService, call_app: CallApp, workers: engine.EngineWorkers, request) -> dict:
    """Run the fit the path names (the admin key checked and the workers ready: routes.Endpoints.fit)."""
    scope = request.scope
    kind = FIT_PATHS[scope["path"]]
    data = parse_json(await read_body(request.receive))
    model = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else None

    async def tokenize(text: str, field: str) -> list[int]:
        status, answer = await call_app(
            scope, "/tokenize", {"prompt": text, **({"model": model} if model else {})}
        )
        tokens = answer.get("tokens") if status == 200 else None
        if not isinstance(tokens, list):
            error = answer.get("error") if isinstance(answer, dict) else None
            message = error.get("message") if isinstance(error, dict) else f"status {status}"
            raise SpecError(field, f"could not be tokenized: {message}", 400 if status < 500 else 502)
        return tokens

    async def call(body: dict, request_id: str) -> tuple[int, dict]:
        return await call_app(scope, "/v1/completions", body, request_id=request_id)

    fits = Engine(tokenize, call, workers.broadcast, engine.max_model_len(scope["app"].state))
    fitter = service.fitter
    return await (fitter.fit_probe(data, fits) if kind == "probe" else fitter.fit_vector(data, fits))
