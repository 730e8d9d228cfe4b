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
