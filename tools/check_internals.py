"""Checks steer_adapters/vllm/internals.py (what of vLLM the adapter relies on) against vLLM builds. A development
tool: it reads the checkout (the pins file, wheels it downloads); the runtime's own start-up check is
steer_adapters/vllm/preflight.py.

    python -m tools.check_internals             # the installed vLLM: import + inspect
    python -m tools.check_internals --pinned    # also every CUDA wheel of steer_adapters/vllm/vllm-versions.txt
    python -m tools.check_internals --version 0.34.0   # a candidate upgrade (source only)
    python -m tools.check_internals --wheel PATH.whl

Two checkers, one list:
- `check_installed()`: imports each module of the running vLLM, resolves each name, reads signatures with
  `inspect.signature`, and reads instance attributes (`self.x = ...`) from the classes' own source along the
  real MRO.
- `check_source(tree)`: the same checks on source text alone, with `ast` (no import): a downloaded wheel (a zip
  read in place) or any mapping of module -> source. This is how the CUDA build is checked on a machine without
  CUDA: importing CUDA vLLM needs its exact CUDA torch (several GB) and its compiled kernels, while what the adapter
  relies on (modules, classes, method names and parameters, fields, assignments) is all in the wheel's Python
  source, which is byte for byte what a GPU machine imports.

Each problem is one line naming the vLLM version, the internal and what moved, e.g.
`vllm 0.34.0: vllm.v1.request.Request.from_engine_core_request lost parameter block_hasher (adapter:
engine_core.patch_prefix_cache)`. Exit status 1 when anything moved. V1-era entries are checked only where the
build still has Model Runner V1.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from steer_adapters.vllm.internals import ALL, V1_RUNNER, Internal
from steer_adapters.vllm.internals_check import (
    Problem,
    Report,
    _ast_params,
    _class_body_names,
    _first_home,
    _Found,
    _member_kind_ast,
    _member_problems,
    _params_problems,
    _self_assignments,
    _value_prefix_problem,
    applicable,
    check_installed,
)
from steer_adapters.vllm.versions import pins_of

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "STEER_VLLM_WHEEL_CACHE"


# --- static: source text, no import --------------------------------------------------------------------------------


class SourceTree:
    """Module sources by dotted name. `files`: "vllm/x/y.py" -> text (lazily read through `read`)."""

    def __init__(self, names: set[str], read: Callable[[str], str], version: str, label: str):
        self._names = names
        self._read = read
        self.version = version
        self.label = label
        self._parsed: dict[str, ast.Module | None] = {}

    @classmethod
    def from_mapping(
        cls, files: Mapping[str, str], version: str = "synthetic", label: str = "source"
    ) -> SourceTree:
        return cls(set(files), files.__getitem__, version, label)

    @classmethod
    def from_wheel(cls, path: Path) -> SourceTree:
        archive = zipfile.ZipFile(path)
        names = {n for n in archive.namelist() if n.endswith(".py")}
        version = path.name.split("-")[1]
        return cls(names, lambda n: archive.read(n).decode("utf-8"), version, f"{path.name} (source, ast)")

    @classmethod
    def from_directory(cls, root: Path, version: str, label: str) -> SourceTree:
        """The `vllm` package under `root` (a site-packages folder), read from disk."""
        names = {p.relative_to(root).as_posix() for p in (root / "vllm").rglob("*.py")}
        return cls(names, lambda n: (root / n).read_text(encoding="utf-8"), version, label)

    def with_files(self, files: Mapping[str, str], label: str) -> SourceTree:
        """This tree with some files replaced or added ("vllm/x/y.py" -> text)."""
        read = self._read
        return SourceTree(
            self._names | set(files), lambda n: files[n] if n in files else read(n), self.version, label
        )

    def files(self) -> list[str]:
        return sorted(self._names)

    def read(self, file: str) -> str:
        return self._read(file)

    def _file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self._names:
                return candidate
        return None

    def is_package(self, module: str) -> bool:
        return (self._file(module) or "").endswith("__init__.py")

    def source(self, module: str) -> str | None:
        file = self._file(module)
        return None if file is None else self._read(file)

    def parse(self, module: str) -> ast.Module | None:
        if module not in self._parsed:
            text = self.source(module)
            self._parsed[module] = None if text is None else ast.parse(text)
        return self._parsed[module]


def _absolute(module: str, level: int, target: str | None, is_package: bool) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _resolve(tree: SourceTree, module: str, name: str, depth: int = 0) -> _Found | None:
    """The top-level definition of `name` as seen from `module`, following `from x import name` re-exports."""
    parsed = tree.parse(module)
    if parsed is None or depth > 8:
        return None
    found = None
    for node in parsed.body:
        found = _match_top_level(tree, module, node, name, depth) or found
    if (
        found is None
    ):  # conditional definitions and imports at module level (if TYPE_CHECKING:, try:) count too
        todo = [n for n in parsed.body if isinstance(n, ast.If | ast.Try)]
        while todo and found is None:
            node = todo.pop(0)
            blocks = [node.body, node.orelse, getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for child in (c for block in blocks for c in block):
                if isinstance(child, ast.If | ast.Try):
                    todo.append(child)
                found = _match_top_level(tree, module, child, name, depth) or found
    if found is None and tree.source(f"{module}.{name}") is not None:
        return _Found(f"{module}.{name}", ast.Module(body=[], type_ignores=[]))  # a submodule
    return found


def _match_top_level(tree: SourceTree, module: str, node: ast.AST, name: str, depth: int) -> _Found | None:
    if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
        return _Found(module, node)
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
        return _Found(module, node)
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
        return _Found(module, node)
    if isinstance(node, ast.ImportFrom):
        for alias in node.names:
            if (alias.asname or alias.name) == name:
                source = _absolute(module, node.level, node.module, tree.is_package(module))
                if not source.startswith("vllm"):
                    return _Found(source, node)  # outside vLLM: taken as present
                return _resolve(tree, source, alias.name, depth + 1) or (
                    _Found(f"{source}.{alias.name}", ast.Module(body=[], type_ignores=[]))
                    if tree.source(f"{source}.{alias.name}") is not None
                    else None
                )
    return None


def _class_chain(tree: SourceTree, found: _Found) -> list[_Found]:
    """The class and its vLLM base classes, depth first (an approximation of the MRO, enough for lookups)."""
    chain, todo, seen = [], [found], set()
    while todo:
        current = todo.pop(0)
        node = current.node
        if not isinstance(node, ast.ClassDef) or (current.module, node.name) in seen:
            continue
        seen.add((current.module, node.name))
        chain.append(current)
        for base in node.bases:
            if isinstance(base, ast.Subscript):
                base = base.value  # Generic[T], Protocol[...]
            if isinstance(base, ast.Name):
                resolved = _resolve(tree, current.module, base.id)
                if resolved is not None:
                    todo.append(resolved)
    return chain


def check_source(tree: SourceTree, internals: tuple[Internal, ...] = ALL) -> Report:
    """Every applicable entry against source text alone (a wheel or a synthetic mapping)."""
    internals = applicable(internals, tree.parse(V1_RUNNER) is not None)
    problems = []
    for internal in internals:
        found = _first_home(internal, lambda i: _check_one_static(tree, i))
        problems += [Problem(internal, what) for what in found]
    return Report(tree.version, tree.label, len(internals), tuple(problems))


def _check_one_static(tree: SourceTree, internal: Internal) -> list[str]:
    if tree.parse(internal.module) is None:
        return (
            ["is gone (no such module)"]
            if internal.kind == "module"
            else [f"is gone: no module {internal.module}"]
        )
    if internal.kind == "module":
        text = tree.source(internal.module) or ""
        if (
            internal.runnable
            and '__name__ == "__main__"' not in text
            and "__name__ == '__main__'" not in text
        ):
            return ["can no longer be run with python -m (no __main__ block)"]
        return []
    if internal.kind == "text":
        text = tree.source(internal.module) or ""
        if internal.name:
            found = _resolve(tree, internal.module, internal.name)
            if found is None or found.module != internal.module:
                return [f"is gone: {internal.module} has no {internal.name}"]
            text = ast.get_source_segment(text, found.node) or ""
        return [] if internal.key in text else [f"no longer contains `{internal.key}`"]
    head, _, member = internal.name.partition(".")
    found = _resolve(tree, internal.module, head)
    if found is None:
        return [f"is gone: {internal.module} has no {head}"]
    if internal.kind == "key":
        value = getattr(found.node, "value", None)
        if not isinstance(value, ast.Dict):
            return [f"is gone: {head} is no longer a dict literal"]
        keys = {k.value for k in value.keys if isinstance(k, ast.Constant)}
        return [] if internal.key in keys else [f"is gone: {head} has no key {internal.key!r}"]
    if not member:
        want = ast.ClassDef if internal.kind == "class" else (ast.FunctionDef, ast.AsyncFunctionDef)
        if not isinstance(found.node, want) and found.node.__class__.__name__ != "ImportFrom":
            return [f"is no longer a {internal.kind}"]
        if internal.kind == "function" and isinstance(found.node, ast.FunctionDef | ast.AsyncFunctionDef):
            return _params_problems(internal, _ast_params(found.node, bound=False))
        return []
    if not isinstance(found.node, ast.ClassDef):
        return [f"is gone: {internal.module}.{head} is no longer a class"]
    chain = _class_chain(tree, found)
    for link in chain:
        node = _class_body_names(link.node).get(member)
        if node is not None:
            fn = node if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else None
            problems = _member_problems(internal, _member_kind_ast(node), fn)
            if internal.value_prefix:
                problems += _value_prefix_problem(internal, chain)
            return problems
    for link in chain:
        if member in _self_assignments(link.node):
            if internal.kind != "attribute":
                return [f"is an instance attribute, no longer a {internal.kind}"]
            return _value_prefix_problem(internal, chain)
    return [f"is gone: {head} has no {internal.kind} {member}"]


# --- the pinned CUDA wheel ----------------------------------------------------------------------------------------


def wheel_cache() -> Path:
    """Where wheels are kept between runs (outside the repository: downloaded once per machine)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "steer-plugin" / "vllm-wheels")


class Fetched(NamedTuple):
    path: Path
    downloaded: bool  # False: it was in the cache
    seconds: float


def fetch_wheel(version: str, cache: Path | None = None) -> Fetched:
    """The `vllm==version` wheel (the CUDA build on PyPI), from the cache or downloaded into it with pip."""
    import fcntl

    cache = cache or wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs on one machine: one downloads, the others wait
        return _fetch_locked(version, cache)


def _fetch_locked(version: str, cache: Path) -> Fetched:
    for path in sorted(cache.glob(f"vllm-{version}-*.whl")):
        try:
            with zipfile.ZipFile(path) as archive:
                if "vllm/__init__.py" in archive.namelist():
                    return Fetched(path, False, 0.0)
            path.unlink()
        except zipfile.BadZipFile:
            path.unlink()  # a broken download: fetch again
    start = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(cache),
    ]
    subprocess.run([*cmd, f"vllm=={version}"], check=True)
    found = sorted(cache.glob(f"vllm-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download vllm=={version} left no wheel in {cache}")
    return Fetched(found[0], True, time.monotonic() - start)


def check_wheel(path: Path, internals: tuple[Internal, ...] = ALL) -> Report:
    return check_source(SourceTree.from_wheel(path), internals)


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.check_internals",
        description="Check what of vLLM the adapter relies on (steer_adapters/vllm/internals.py).",
    )
    parser.add_argument(
        "--pinned",
        action="store_true",
        help="also every CUDA wheel pinned in steer_adapters/vllm/vllm-versions.txt",
    )
    parser.add_argument(
        "--version", action="append", default=[], help="also the CUDA wheel of this vllm version"
    )
    parser.add_argument(
        "--wheel", action="append", default=[], type=Path, help="also this wheel (source only)"
    )
    parser.add_argument("--no-installed", action="store_true", help="skip the installed vLLM")
    args = parser.parse_args(argv)
    reports = []
    if not args.no_installed:
        reports.append(check_installed())
    versions = list(args.version)
    if args.pinned:
        versions[:0] = [p.version for p in pins_of("gpu", "vllm")]
    wheels = list(args.wheel)
    for version in versions:
        fetched = fetch_wheel(version)
        how = f"downloaded in {fetched.seconds:.1f}s" if fetched.downloaded else "cached"
        size = fetched.path.stat().st_size / 1e6
        print(f"wheel {fetched.path} ({size:.0f} MB, {how})", file=sys.stderr)
        wheels.append(fetched.path)
    reports += [check_wheel(w) for w in wheels]
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
