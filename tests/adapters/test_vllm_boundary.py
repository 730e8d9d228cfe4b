"""vLLM's internals stay in the adapter's glue modules (GLUE below; listed in internals.py, checked by
tools/check_internals.py): every other module of the plugin (steer_plugin/, steer_adapters/, the middleware, the launcher,
the worker extension included) is read with `ast` and must not

- import `vllm` or any `vllm.*` module (`import` or `from ... import`, at any depth in the module), and
- name vLLM's engine client or its RPC: no attribute, variable, parameter, keyword or function named
  `engine_client` / `collective_rpc`, and no string equal to either (`getattr(state, "engine_client")`).

What it does not see: the names inside longer strings (docstrings, the launcher's `python -m
vllm.entrypoints.openai.api_server` command line, which is vLLM's public CLI) and duck-typed objects handed over
by the glue (the middleware holds an api.engine.EngineWorkers, never the engine client).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The modules that may touch vLLM's internals (each internal listed in internals.py), by process.
GLUE = {
    "steer_adapters/vllm/internals.py",
    "steer_adapters/vllm/internals_check.py",
    "steer_adapters/vllm/worker/abort.py",
    "steer_adapters/vllm/engine_core.py",
    "steer_adapters/vllm/worker/install.py",
    "steer_adapters/vllm/worker/runner_v1.py",
    "steer_adapters/vllm/worker/runner_v2.py",
    "steer_adapters/vllm/api/engine.py",
    "steer_adapters/vllm/api/serve.py",
}
ENGINE_NAMES = {"engine_client", "collective_rpc"}


def _outside_the_glue() -> list[Path]:
    files = sorted((REPO / "steer_plugin").rglob("*.py")) + sorted((REPO / "steer_adapters").rglob("*.py"))
    return [p for p in files if p.relative_to(REPO).as_posix() not in GLUE]


def violations(source: str) -> list[str]:
    """Each reach into vLLM `source` makes, as `line: what`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] == "vllm"]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "vllm"
        ):
            found.append(f"{line}: from {node.module} import ...")
        names = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.keyword):
            names = [node.arg]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [node.name]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        found += [f"{line}: {n}" for n in names if n in ENGINE_NAMES]
    return sorted(found, key=lambda v: int(v.split(":")[0]))


def test_the_boundary_covers_the_middleware_and_the_launcher():
    names = {p.relative_to(REPO).as_posix() for p in _outside_the_glue()}
    for expected in (
        "steer_adapters/vllm/api/middleware.py",
        "steer_adapters/vllm/api/launcher.py",
        "steer_adapters/vllm/plugin.py",
        "steer_adapters/vllm/worker/extension.py",
        "steer_plugin/admin.py",
    ):
        assert expected in names
    assert not GLUE & names


@pytest.mark.parametrize("path", _outside_the_glue(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_vllm_internals_outside_the_glue(path):
    assert violations(path.read_text()) == []


def test_the_check_sees_each_kind_of_reach():
    """What the middleware did before the engine access moved into api.engine.EngineWorkers, and other spellings."""
    source = """
import vllm.envs
from vllm.config import VllmConfig
async def pull(scope, engine_client=None):
    engine = getattr(scope["app"].state, "engine_client", None)
    await engine.collective_rpc("steer_plugin_stats", timeout=10)
    state.engine_client.do(x=1)
    def collective_rpc(): pass
    run(engine_client=1)
"""
    assert violations(source) == [
        "2: import vllm.envs",
        "3: from vllm.config import ...",
        "4: engine_client",
        "5: engine_client",
        "6: collective_rpc",
        "7: engine_client",
        "8: collective_rpc",
        "9: engine_client",
    ]
    assert (
        violations('"""Calls vLLM\'s collective_rpc."""\nfrom steer_adapters.vllm.api import engine\n') == []
    )
