"""Reading a request body the way a shared server must: every malformed input is a SpecError (a 400 naming
the field), never a Python exception escaping into the web server.

- JSON that fails to parse, is not UTF-8, nests deeper than MAX_DEPTH, or holds an integer literal longer
  than Python converts (4,300 digits) is refused with `param: "body"`.
- `reserved_key_path` finds the plugin's own wire keys anywhere in a body (a client must not forge them).
- `lax_int` reads an integer field the way vLLM's pydantic models do (2, "2", 2.0), or names the field.
"""

from __future__ import annotations

import json
import math

from pydantic import TypeAdapter, ValidationError

from steer_plugin.request.schema import SpecError
from steer_plugin.request.wire import RESERVED_KEYS

MAX_DEPTH = 128  # far above any real chat/completion body; json.dumps and pydantic recurse per level

_LAX_INT = TypeAdapter(int)


def parse_json(raw: bytes) -> object:
    """The parsed body, or SpecError('body', ...)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("body", "must be UTF-8 encoded JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError("body", f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise SpecError("body", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # int literal past sys.get_int_max_str_digits()
        raise SpecError("body", "a number in the body has too many digits") from None
    if nesting_depth(data) > MAX_DEPTH:
        raise SpecError("body", f"JSON nested deeper than {MAX_DEPTH} levels")
    return data


def nesting_depth(data: object) -> int:
    """Depth of nested lists/objects (iterative: safe on any input)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def reserved_key_path(data: object, prefix: str = "") -> str | None:
    """JSON path of the first object key that is one of the plugin's wire keys, anywhere in `data`."""
    stack = [(data, prefix)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                sub = f"{path}.{key}" if path else str(key)
                if key in RESERVED_KEYS:
                    return sub
                stack.append((value, sub))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))
    return None


def refuse_reserved_keys(data: object) -> None:
    path = reserved_key_path(data)
    if path is not None:
        raise SpecError(path, "is reserved for the steering plugin; use the `steering` field")


def lax_int(body: dict, field: str, default: int) -> int:
    """An integer field as vLLM reads it (pydantic lax mode), or SpecError naming it."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(field, "must be an integer")
    try:
        return _LAX_INT.validate_python(value)
    except ValidationError:
        raise SpecError(field, "must be an integer") from None


def prompt_count(body: dict) -> int:
    """How many prompts a /v1/completions body holds (a list of strings or of token-id lists is several)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1
