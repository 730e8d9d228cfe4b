"""The benchmarks' imports, read with `ast` (nothing is imported): no benchmark module uses another one's private
(underscore) names, whether imported (`from serve_bench import _run_requests`), reached through a module
(`serve_bench._run_requests`) or on an object it made (`bench._cmd(...)`); and every name a benchmark takes from
a sibling module (benchmarks/*.py, the harness package) exists there, and every module it imports at its top
level exists (nothing imports a deleted benchmark)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_files(root: Path = BENCH) -> dict[str, Path]:
    """Dotted module name -> file, for the benchmarks as they import each other (benchmarks/ on sys.path)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # side venvs and the like
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.If | ast.Try):  # guarded definitions
            names |= top_level_names(ast.Module(body=list(ast.iter_child_nodes(node)), type_ignores=[]))
    return names


def private_definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines anywhere: functions, classes, variables, attributes it assigns."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return {n for n in out if _private(n)}


def _guarded(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside a `try` (optional dependencies: matplotlib and the like)."""
    return {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}


def _parent(mod: str) -> str:
    return mod.rsplit(".", 1)[0] if "." in mod else ""


def problems(sources: dict[str, str], installed=lambda name: importlib.util.find_spec(name) is not None):
    """What is wrong with the imports of these modules (dotted name -> source), as sentences."""
    trees = {mod: ast.parse(src) for mod, src in sources.items()}
    privates = {mod: private_definitions(t) for mod, t in trees.items()}
    exported = {mod: top_level_names(t) | {m.rsplit(".", 1)[1] for m in trees if _parent(m) == mod}
                for mod, t in trees.items()}  # fmt: skip
    out = []
    for mod, tree in trees.items():
        aliases, found = _imports(mod, tree, trees, exported, installed)
        others = set().union(*(p for m, p in privates.items() if m != mod)) - privates[mod]
        out += found + _attributes(mod, tree, trees, aliases, exported, others, privates)
    return out


def _imports(mod, tree, trees, exported, installed) -> tuple[dict[str, str], list[str]]:
    """(local name -> the sibling module it is bound to, problems) of a module's import statements."""
    guarded = _guarded(tree)
    aliases: dict[str, str] = {}
    out = []

    def missing(node: ast.stmt, name: str) -> bool:  # only what the module needs to load at all
        return node.col_offset == 0 and id(node) not in guarded and not installed(name.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in trees:
                    if a.name not in trees:
                        out.append(f"{mod}: imports {a.name}, which does not exist")
                    aliases[a.asname or top] = a.name if a.asname else top
                elif missing(node, a.name):
                    out.append(f"{mod}: imports {a.name}, which does not exist")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                pkg = mod if mod in trees and any(_parent(m) == mod for m in trees) else _parent(mod)
                for _ in range(node.level - 1):
                    pkg = _parent(pkg)
                base = f"{pkg}.{base}".strip(".")
            if base.split(".")[0] not in trees:
                if missing(node, base):
                    out.append(f"{mod}: imports from {base}, which does not exist")
                continue
            if base not in trees:
                out.append(f"{mod}: imports from {base}, which does not exist")
                continue
            for a in node.names:
                if _private(a.name):
                    out.append(f"{mod}: imports the private name {a.name} of {base}")
                elif f"{base}.{a.name}" in trees:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif a.name != "*" and a.name not in exported[base]:
                    out.append(f"{mod}: imports {a.name} from {base}, which has no such name")
    return aliases, out


def _attributes(mod, tree, trees, aliases, exported, others, privates) -> list[str]:
    """Problems of a module's attribute accesses: another module's private or missing names."""

    def bound(node: ast.expr) -> str | None:
        """The sibling module an expression names (`sb`, `harness.load`), if any."""
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            outer = bound(node.value)
            return f"{outer}.{node.attr}" if outer and f"{outer}.{node.attr}" in trees else None
        return None

    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        target = bound(node.value)
        if target is not None and _private(node.attr):
            out.append(f"{mod}: uses the private name {node.attr} of {target} (line {node.lineno})")
        elif target is not None and node.attr not in exported[target]:
            out.append(f"{mod}: uses {target}.{node.attr}, which does not exist (line {node.lineno})")
        elif target is None and node.attr in others:
            owners = sorted(m for m, p in privates.items() if m != mod and node.attr in p)
            out.append(
                f"{mod}: uses the private name {node.attr} of {', '.join(owners)} (line {node.lineno})"
            )
    return out


def test_no_benchmark_uses_another_ones_private_names_and_every_import_resolves():
    sources = {mod: path.read_text() for mod, path in module_files().items()}
    assert {"serve_bench", "sched_probe", "harness.servers", "harness.load", "harness.cpu"} <= set(sources)
    assert problems(sources) == []


def test_the_check_finds_each_kind_of_problem():
    """The walk above would see these: a private name imported, reached through a module or on an object of
    another module, a name or a module that does not exist; public names and a module's own privates pass."""
    sources = {
        "harness": "",
        "harness.load": "def run_requests(): pass\ndef _one(): pass\n",
        "serve_bench": "class Bench:\n    def _cmd(self): pass\ndef _run(): pass\nPROMPTS = []\n",
        "good": "from serve_bench import Bench, PROMPTS\nfrom harness.load import run_requests\n"
        "from harness import load\nimport serve_bench as sb\nsb.Bench()._helper = 1\nload.run_requests()\n"
        "def _mine(): pass\n_mine()\ntry:\n    import not_installed_optional\nexcept ImportError:\n    pass\n",
        "bad1": "from serve_bench import _run\n",
        "bad2": "import serve_bench as sb\nsb._run()\n",
        "bad3": "from serve_bench import Bench\nBench()._cmd()\n",
        "bad4": "from harness import load\nload._one()\n",
        "bad5": "import peer_vllm_lens\n",
        "bad6": "from serve_bench import _run_requests, LIVE_SERVERS\n",
        "bad7": "import harness.load\nharness.load.missing()\n",
    }
    found = problems(sources, installed=lambda name: name == "json")
    for bad in ("bad1", "bad2", "bad3", "bad4", "bad5", "bad7"):
        assert [p for p in found if p.startswith(bad + ":")], (bad, found)
    assert len([p for p in found if p.startswith("bad6:")]) == 2, found  # private, and a name that is gone
    assert not [p for p in found if p.startswith("good:")], found
