"""The API reference page: the OpenAPI additions the middleware publishes on vLLM's own /openapi.json (the
`steering` field of both completion requests, the plugin's routes), generated from the same code
(api/openapi.add_steering_to_openapi, from the routes' pydantic models) at every documentation build.

    python -m tools.openapi_reference       # print the page
"""

from __future__ import annotations

import json

from steer_adapters.vllm.api.openapi import REQUEST_SCHEMAS, add_steering_to_openapi


def document() -> dict:
    """What the middleware adds to vLLM's document, on a stand-in with vLLM's two completion request schemas."""
    doc = {
        "components": {"schemas": {name: {"type": "object", "properties": {}} for name in REQUEST_SCHEMAS}}
    }
    return add_steering_to_openapi(doc, admin=True)


def page() -> str:
    doc = document()
    paths = doc.get("paths", {})
    lines = [
        "# OpenAPI reference",
        "",
        "Generated at every documentation build from the code that serves it: a server with a steering config",
        "adds these to vLLM's own `GET /openapi.json` (the admin routes only when `runtime` and an admin key are",
        "set). `steering` is accepted on " + " and ".join(f"`{n}`" for n in REQUEST_SCHEMAS) + ".",
        "",
        "## Routes",
        "",
        "| route | summary |",
        "|---|---|",
    ]
    for path, methods in sorted(paths.items()):
        for method, op in methods.items():
            lines.append(f"| `{method.upper()} {path}` | {op.get('summary', '')} |")
    lines += ["", "## Schemas", "", "```json", json.dumps(doc, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(page())
