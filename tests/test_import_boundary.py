"""The runtime (steer_plugin/, steer_adapters/) never imports the demo-asset builder (steer_demo/).

The builder depends on the runtime (it loads its SAE with steer_plugin.sae, serves through the launcher), never the
other way: a server install must not need the builder's code paths (transformers conversion, corpus, training).
Checked on the source text (AST), so an import inside a function, which a plain `import steer_plugin` would not
execute, is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_TREES = ("steer_plugin", "steer_adapters")
DEMO = "steer_demo"


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement, and of importlib.import_module("...") /
    __import__("...") calls with a literal name. Relative imports stay inside their own tree: left out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _runtime_imports() -> dict[str, list[tuple[int, str]]]:
    out = {}
    for folder in RUNTIME_TREES:
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
                out[path.relative_to(REPO).as_posix()] = _imported_modules(tree)
    return out


def test_runtime_never_imports_the_demo_builder():
    offending = [
        f"{path}:{line} imports {module}"
        for path, imports in _runtime_imports().items()
        for line, module in imports
        if module == DEMO or module.startswith(DEMO + ".")
    ]
    assert not offending, "the runtime imports the demo builder:\n" + "\n".join(offending)


def test_the_scan_sees_the_imports_it_must_see():
    """Not vacuous: the scan finds known cross-tree imports (the adapters use the core) and lazy ones."""
    imports = _runtime_imports()
    assert len(imports) > 40
    launcher = {module for _, module in imports["steer_adapters/vllm/api/launcher.py"]}
    assert "steer_plugin.config" in launcher  # top-level `from steer_plugin.config import ...`
    assert "steer_plugin.catalog" in launcher  # inside build_vllm_args
    lazy = ast.parse("def f():\n    import importlib\n    importlib.import_module('steer_demo.common')\n")
    assert (3, "steer_demo.common") in _imported_modules(lazy)


def test_the_demo_package_is_beside_the_runtime_not_inside_it():
    assert (REPO / DEMO / "build_assets.py").is_file()
    assert not (REPO / "steer_plugin" / "demo").exists()


# --- the API process never loads the engine; the engine's modules import each other one way ----------------------

ENGINE = "steer_plugin.engine"
# What the API process loads of the plugin (the middleware's imports and the modules they load): the messages it
# exchanges with the workers come from steer_plugin.messages, never from the engine.
API_PROCESS = (
    "steer_plugin/admin.py",
    "steer_plugin/service.py",
    "steer_plugin/metrics.py",
    "steer_plugin/messages.py",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "steer_adapters/vllm/api").glob("*.py")),
)


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only: never run)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
            if name == "TYPE_CHECKING":
                inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _names_imported(tree: ast.AST, at_runtime: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import; `from a import b` gives both a and a.b (b may be a
    module). With at_runtime, imports under `if TYPE_CHECKING:` are left out."""
    skip = _type_checking_blocks(tree) if at_runtime else set()
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _parse(relative: str) -> ast.AST:
    path = REPO / relative
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_engine(module: str) -> bool:
    return module == ENGINE or module.startswith(ENGINE + ".")


def test_api_process_modules_never_import_the_engine():
    """Not even for annotations: the API process reads the workers' messages from steer_plugin.messages."""
    offending = [
        f"{path}:{line} imports {module}"
        for path in API_PROCESS
        for line, module in _names_imported(_parse(path))
        if _is_engine(module)
    ]
    assert not offending, "the API process would load the engine:\n" + "\n".join(offending)


def test_the_api_process_loads_no_engine_module():
    """The same, followed through every module they import (a fresh interpreter, as the API process starts)."""
    import subprocess
    import sys

    modules = [p.removesuffix(".py").replace("/", ".") for p in API_PROCESS]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m == {ENGINE!r} or m.startswith({ENGINE + '.'!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _engine_graph(at_runtime: bool) -> dict[str, set[str]]:
    """steer_plugin.engine module -> the engine modules it imports."""
    graph = {}
    for path in sorted((REPO / "steer_plugin/engine").glob("*.py")):
        name = f"{ENGINE}.{path.stem}" if path.stem != "__init__" else ENGINE
        tree = _parse(path.relative_to(REPO).as_posix())
        graph[name] = {m for _, m in _names_imported(tree, at_runtime) if _is_engine(m) and m != name} - {
            ENGINE
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle (each found once per module on it), by depth-first search."""
    found = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt not in path and nxt in graph:
                walk(nxt, [*path, nxt])

    for start in graph:
        walk(start, [start])
    return found


def test_runtime_loads_and_the_steerer_import_each_other_one_way():
    """The steerer builds RuntimeLoads over a narrow LoadTarget; runtime_loads never names the Steerer, not even
    for annotations (it would be the circle again)."""
    graph = _engine_graph(at_runtime=False)
    steerer, loads = f"{ENGINE}.steerer", f"{ENGINE}.runtime_loads"
    assert loads in graph[steerer]  # not vacuous: the steerer does import it
    assert steerer not in graph[loads]
    assert not [c for c in _cycles(graph) if steerer in c and loads in c]


def test_the_engine_modules_import_each_other_in_no_circle():
    """At run time (imports under `if TYPE_CHECKING:` never run) no engine module imports itself back."""
    assert _cycles(_engine_graph(at_runtime=True)) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
        ["a", "b", "c", "a"],
        ["b", "c", "a", "b"],
        ["c", "a", "b", "c"],
    ]
