"""vLLM's OpenAPI document with the plugin's additions: `steering` on both completion requests, and the plugin's
own routes (api/routes.py), each entry generated from its route: the path and its parameters from the Starlette
path, query parameters, request body and answer from the route's pydantic models (`Doc`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import BaseModel

from steer_adapters.vllm.api.routes import documented_routes
from steer_adapters.vllm.api.routing import KIND, PluginRoute
from steer_plugin.admin import KINDS, START_UP_ONLY_KEYS
from steer_plugin.config import SAESource
from steer_plugin.request.schema import SteeringSpec

REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest")
REF = "#/components/schemas/{model}"
ADMIN_KEY = {"name": "X-Steer-Admin-Key", "in": "header", "required": True, "schema": {"type": "string"}}


def add_steering_to_openapi(doc: dict, admin: bool = False, routes: bool = True) -> dict:
    """vLLM's schema with `steering` on both completion requests and, with `routes`, the plugin's routes (the
    admin routes when they exist)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    spec = _register(schemas, SteeringSpec)
    for name in REQUEST_SCHEMAS:
        if name in schemas:
            schemas[name].setdefault("properties", {})["steering"] = {
                "anyOf": [spec, {"type": "null"}],
                "description": "Per-request SAE feature steering and inspection (steer_plugin).",
            }
    if routes:
        paths = doc.setdefault("paths", {})
        for route in documented_routes(admin):
            for path, operation in _operations(route, schemas):
                paths.setdefault(path, {})[route.method.lower()] = operation
    return doc


def _register(schemas: dict, model: type[BaseModel]) -> dict:
    """`model`'s JSON schema (and those it refers to) in components.schemas; a $ref to it."""
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    if model is SAESource:  # a runtime load takes a path; SAEs named by release are start-up only
        for name in START_UP_ONLY_KEYS:
            schema["properties"].pop(name, None)
        schema["required"] = sorted({*schema.get("required", []), "path"})
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _operations(route: PluginRoute, schemas: dict):
    """(OpenAPI path, operation) for each path `route` serves (one per kind segment)."""
    doc = route.doc
    for kind in KINDS if KIND in route.path else (None,):
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path.replace(KIND, kind or ""))
        parameters = [ADMIN_KEY] if doc.admin_key else []
        parameters += [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        if doc.query is not None:
            parameters += _query_parameters(doc.query)
        operation: dict = {"summary": doc.summary.format(kind=kind), "parameters": parameters}
        body = _by_kind(doc.body, kind)
        if body is not None:
            content = {"application/json": {"schema": _register(schemas, body)}}
            operation["requestBody"] = {"required": True, "content": content}
        answer = _by_kind(doc.answer, kind)
        operation["responses"] = {str(code): {"description": text} for code, text in doc.responses.items()}
        if answer is not None:
            success = operation["responses"][str(next(iter(doc.responses)))]
            success["content"] = {"application/json": {"schema": _register(schemas, answer)}}
        yield path, operation


def _by_kind(value, kind: str | None):
    return value[kind] if isinstance(value, Mapping) else value


def _query_parameters(model: type[BaseModel]) -> list[dict]:
    schema = model.model_json_schema(ref_template=REF)
    out = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        options = [p for p in prop.pop("anyOf", []) if p != {"type": "null"}]  # a query value is never null
        if options:
            prop = {**options[0], **prop}
        if prop.get("default", 0) is None:
            del prop["default"]
        parameter = {
            "name": name,
            "in": "query",
            "required": name in schema.get("required", ()),
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        out.append(parameter)
    return out
