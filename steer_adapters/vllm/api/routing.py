"""Starlette routing as the plugin's routes use it from inside a middleware: a route per method and path
(`PluginRoute`, with its /openapi.json `Doc`), the path convertors they need, and `matching_route`, which finds the
route of a request by its exact path and method, or None (the request is vLLM's).

Errors are not answered here: a handler's SpecError reaches the middleware, which answers it in the OpenAI error
shape (vLLM's own exception handlers are not applied to the plugin's routes).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response
from starlette.routing import Match, Route, Router

from steer_plugin.admin import KINDS


class _Segments(Convertor[str]):
    """A fixed set of path segments (Starlette's `str` takes any)."""

    def __init__(self, *values: str):
        self.values = values
        self.regex = "|".join(values)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _Slashes(Convertor[str]):
    regex = "/*"  # `/playground`, `/playground/`, ...

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


KIND = "{kind:steer_kind}"  # saes | vectors (steer_plugin.admin.KINDS)
register_url_convertor("steer_kind", _Segments(*KINDS))
register_url_convertor("steer_slashes", _Slashes())


@dataclass(frozen=True)
class Doc:
    """A route's /openapi.json entry. `body` and `answer` may depend on the kind segment (a mapping by it)."""

    summary: str  # `{kind}`: the kind segment
    responses: dict[int, str]  # status -> description; the first is the success answer
    query: type[BaseModel] | None = None
    body: type[BaseModel] | Mapping[str, type[BaseModel]] | None = None
    answer: type[BaseModel] | Mapping[str, type[BaseModel]] | None = None
    admin_key: bool = False


class PluginRoute(Route):
    """One method on one path; documented in /openapi.json when it has a `doc`."""

    def __init__(self, path: str, endpoint, method: str, doc: Doc | None = None):
        super().__init__(path, endpoint, methods=[method], include_in_schema=doc is not None)
        self.method = method
        self.doc = doc


class JSONAnswer(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return json.dumps(content).encode()


def matching_route(router: Router, scope: dict):
    """The ASGI handler of the route of `router` that answers `scope`, or None."""
    for route in router.routes:
        found, child = route.matches({**scope, "root_path": ""})  # the path as the client sent it
        if found is Match.FULL and scope["method"] == route.method:  # (Starlette adds HEAD to GET)
            return functools.partial(_handle, route, child)
    return None


async def _handle(route: PluginRoute, child: dict, scope, receive, send) -> None:
    scope = {
        k: v for k, v in scope.items() if k != "starlette.exception_handlers"
    }  # errors: the middleware's
    await route.handle({**scope, **child, "route": route}, receive, send)
