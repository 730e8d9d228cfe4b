"""Steering with vLLM's offline `LLM` class: one call from a `steering` dict to SamplingParams.extra_args.

    llm = LLM(model, additional_config={"steer_plugin": {"config_path": "steer.json"}})
    params = SamplingParams(max_tokens=64, extra_args=steering_args(llm, {"features": [...]}))

The same parse and planning as the OpenAI server (steer_plugin.request.plan), signed in this process
(the engine core and the workers inherit its key). Steering operations only: `inspect`, `abort_when` and
`compare` report through the server's HTTP responses, which an offline run does not have.
"""

from __future__ import annotations

from steer_plugin.catalog import LoadedAssets, load_assets
from steer_plugin.config import SteerConfig, config_from_sources
from steer_plugin.request.plan import Endpoint, plan_request
from steer_plugin.request.resolve import Catalog
from steer_plugin.request.schema import SpecError, SteeringSpec, parse_spec
from steer_plugin.request.wire import WIRE_KEY, RequestPlan

_SERVER_ONLY = ("inspect", "abort_when", "compare")
_catalogs: dict[str, Catalog] = {}  # by the config's JSON: loading the sources once per config


def steering_args(source, steering: dict | SteeringSpec | None) -> dict:
    """SamplingParams.extra_args steering the request as `steering` says ({} for no operation).

    `source`: the `LLM` (its additional_config names the steering config), a `SteerConfig`, or `LoadedAssets`.
    Raises SpecError naming the bad field, as the server's 400/403 would."""
    if steering is None:
        return {}
    catalog, config = _catalog(source)
    spec = parse_spec(steering)
    for field in _SERVER_ONLY:
        if getattr(spec, field) not in (None, [], False):
            raise SpecError(f"steering.{field}", "is served by the OpenAI server only (not offline)")
    ops = plan_request(spec, catalog, config, Endpoint.offline()).ops
    return {WIRE_KEY: RequestPlan.build(list(ops)).encode()} if ops else {}


def _catalog(source) -> tuple[Catalog, SteerConfig]:
    if isinstance(source, LoadedAssets):
        return source.catalog(_runtime_layers(source.config, None)), source.config
    d_model = num_layers = None
    if isinstance(source, SteerConfig):
        config = source
    else:  # vllm.LLM
        vllm_config = source.llm_engine.vllm_config
        config = config_from_sources(vllm_config.additional_config)
        if config is None:
            raise ValueError("this LLM has no steering config (additional_config['steer_plugin'])")
        d_model = vllm_config.model_config.get_hidden_size()
        num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
    key = f"{config.model_dump_json()}|{d_model}|{num_layers}"
    if key not in _catalogs:
        assets = load_assets(config, d_model=d_model, explanations=False)._replace(model_d_model=d_model)
        _catalogs[key] = assets.catalog(_runtime_layers(config, num_layers))
    return _catalogs[key], config


def _runtime_layers(config: SteerConfig, num_layers: int | None) -> tuple[int, ...]:
    """Layers reserved for runtime loads steer too (inline vectors may target them)."""
    runtime = config.runtime
    return runtime.reserved_layers(num_layers) if runtime is not None else ()
