"""The configuration reference page, generated from the pydantic models of steer_plugin/config.py: each model a
section, each field its JSON key, type, default and docstring (the docstrings are the only place the fields are
described). Written into docs/reference/ by the MkDocs hook (tools/mkdocs_hooks.py) before every build, so the site
cannot drift from the code.

    python -m tools.config_reference        # print the page
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from steer_plugin.config import SteerConfig


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """The root model and every model its fields name, depth first, each once."""
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            for inner in _nested(field.annotation):
                visit(inner)

    visit(root)
    return seen


def _nested(annotation: Any) -> list[type[BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested(arg)]


def _type(annotation: Any) -> str:
    """A JSON-minded spelling: list[...], object of ..., a | b, literal values quoted."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"object of {_type(args[1])}"
    if annotation is type(None):
        return "null"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return (
            "`"
            + (json.dumps(value.model_dump()) if isinstance(value, BaseModel) else json.dumps(value))
            + "`"
        )
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def page(root: type[BaseModel] = SteerConfig) -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `steer_plugin/config.py` at every documentation build: each object of the steering config,",
        "its keys, their types and defaults, and what each does. Unknown keys are refused at start-up.",
        "",
    ]
    for model in _models(root):
        name = "SteerConfig (the file)" if model is root else model.__name__
        lines += [f"## {name}", ""]
        doc = model.__dict__.get("__doc__")  # the model's own docstring, not one it inherits from pydantic
        if doc:
            lines += [_cell(inspect.cleandoc(doc)), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in model.model_fields.items():
            lines.append(
                f"| `{key}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
                f"{_cell(field.description or '')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(page())
