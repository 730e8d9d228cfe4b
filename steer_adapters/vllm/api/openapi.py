"""vLLM's OpenAPI document with the plugin's additions: `steering` on both completion requests, and the admin
routes when they exist (their schemas generated from the pydantic models)."""

from __future__ import annotations

from steer_plugin.admin import START_UP_ONLY_KEYS
from steer_plugin.config import ProbeSource, SAESource, VectorSource
from steer_plugin.fitting.bodies import FitProbeBody, FitVectorBody
from steer_plugin.request.schema import SteeringSpec

REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest")


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
    for segment, model in (("saes", SAESource), ("vectors", VectorSource), ("probes", ProbeSource)):
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
    for segment, model in (("probes", FitProbeBody), ("vectors", FitVectorBody)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))  # Example, Pair
        schemas[model.__name__] = schema
        body = {"$ref": f"#/components/schemas/{model.__name__}"}
        paths[f"/v1/steering/{segment}:fit"] = {
            "post": {
                "summary": f"Fit one of {segment} from examples on the running server and load it",
                "parameters": [key],
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    code: {"description": text}
                    for code, text in (
                        ("201", "Fitted, saved under the first runtime root and loaded: its figures"),
                        ("400", "A bad field (`param` names it)"),
                        ("401", "Missing or wrong admin key"),
                        ("409", "The id or the save_to name is taken, or another fit is running"),
                    )
                },
            }
        }
