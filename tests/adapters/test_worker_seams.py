"""The vLLM seams the plugin uses on the worker side and the API side:

- SteerWorkerExtension, mixed into a worker class by vLLM's own WorkerWrapperBase.init_worker (the code
  `--worker-extension-cls` runs), reached by name through vLLM's own run_method (what collective_rpc runs on each
  worker), with no name clashing with the real CPU/GPU worker classes (vLLM asserts that);
- the plugin loaded as plain vLLM loads it (vllm.plugins.load_general_plugins, in a fresh process) leaves vLLM's
  choice of model runner alone, with or without a steering config;
- api_engine.EngineWorkers: the API side's calls, against a stand-in engine client;
- steer-serve adds `--worker-extension-cls`, keeps a user's class composed with ours, refuses any other; a
  multi-node server's other nodes (`--headless`) run through `vllm serve`, and no node of one starts without
  STEER_PLUGIN_WIRE_KEY.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from steer_adapters.vllm.api import engine as api_engine
from steer_adapters.vllm.api import launcher
from steer_adapters.vllm.worker import extension as worker_extension
from steer_adapters.vllm.worker.extension import EXTENSION_PATH, SteerWorkerExtension
from steer_plugin.messages import LoadCommand, LoadOutcome, WorkerStats

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


class FakeSteerer:
    """What the extension reads from a worker's steerer: stats() and runtime_loads.command(wire dict)."""

    def __init__(self):
        self.commands: list[dict] = []
        self.runtime_loads = SimpleNamespace(command=self._command)

    def stats(self) -> WorkerStats:
        return WorkerStats(step_errors=7)

    def _command(self, raw: dict) -> LoadOutcome:
        self.commands.append(raw)
        return LoadOutcome(ok=True, error=raw["id"])


# --- the extension inside vLLM's own worker machinery ---------------------------------------------------------


@pytest.fixture
def vllm_worker(monkeypatch):
    """A WorkerWrapperBase whose init_worker ran with worker_extension_cls = ours, on a worker class that
    subclasses the CPU build's real worker (so vLLM's clash check runs against every name CPUWorker and the GPU
    Worker have). Only the worker's constructor is stubbed: the test is about the class vLLM builds."""
    import vllm.v1.worker.worker_base as worker_base
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.v1.worker.cpu_worker import CPUWorker

    module = types.ModuleType("steer_test_workers")

    class StubWorker(CPUWorker):
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    module.StubWorker = StubWorker
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # init_worker loads general plugins: none here. vLLM marks them loaded for the whole process, so the mark is
    # set (and undone) by monkeypatch; VLLM_PLUGINS="" would leave later in-process engines without the plugin.
    import vllm.plugins

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", True)
    # the multimodal receiver cache needs a model config; this test has no model
    monkeypatch.setattr(worker_base, "worker_receiver_cache_from_config", lambda *args: None)
    parallel = ParallelConfig(worker_cls=f"{module.__name__}.StubWorker", worker_extension_cls=EXTENSION_PATH)
    wrapper = worker_base.WorkerWrapperBase(rpc_rank=0)
    wrapper.init_worker([{"vllm_config": VllmConfig(parallel_config=parallel)}])
    return wrapper


def test_vllm_mixes_the_extension_into_the_worker_and_runs_it_by_name(vllm_worker):
    from vllm.v1.serial_utils import run_method

    worker = vllm_worker.worker
    assert isinstance(worker, SteerWorkerExtension)
    assert type(worker).__bases__[-1] is SteerWorkerExtension  # appended: the worker's own methods come first
    # no steerer yet (no steering config on this worker): stats are None, a load is refused
    assert run_method(vllm_worker, "steer_plugin_stats", (), {}) is None
    with pytest.raises(worker_extension.NoSteererError):
        run_method(vllm_worker, "steer_plugin_load", ({"id": "x"},), {})
    steerer = FakeSteerer()
    worker_extension.attach(worker, steerer)
    # the messages leave the worker as their wire dicts (what vLLM's msgpack carries back to the API process)
    stats = run_method(vllm_worker, "steer_plugin_stats", (), {})
    assert type(stats) is dict and WorkerStats.from_wire(stats).step_errors == 7
    outcome = run_method(vllm_worker, "steer_plugin_load", ({"id": "x"},), {})
    assert type(outcome) is dict and LoadOutcome.from_wire(outcome) == LoadOutcome(ok=True, error="x")
    assert steerer.commands == [{"id": "x"}]
    # the steerer is kept by worker, not set on it
    assert not any("steer" in name for name in vars(worker))


def test_another_worker_does_not_see_this_workers_steerer():
    class Worker(SteerWorkerExtension):
        pass

    a, b = Worker(), Worker()
    worker_extension.attach(a, FakeSteerer())
    assert a.steer_plugin_stats() == WorkerStats(step_errors=7).wire()
    assert b.steer_plugin_stats() is None


# --- the runner choice ------------------------------------------------------------------------------------------


def _config(tmp_path, **extra) -> str:
    path = tmp_path / "steer.json"
    path.write_text(json.dumps({"vectors": [], **extra}))
    return str(path)


_PLAIN_VLLM = """
import os
from vllm.plugins import load_general_plugins
from steer_adapters.vllm import plugin
load_general_plugins()
print(plugin._registered, os.environ.get("VLLM_USE_V2_MODEL_RUNNER"))
"""


@pytest.mark.parametrize("with_config", [False, True])
def test_plain_vllm_loading_the_plugin(tmp_path, with_config):
    """As vLLM loads general plugins in a fresh process: the plugin registers and never picks the runner."""
    env = {
        k: v for k, v in os.environ.items() if k not in (RUNNER_ENV, "STEER_PLUGIN_CONFIG", "VLLM_PLUGINS")
    }
    if with_config:
        env["STEER_PLUGIN_CONFIG"] = _config(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN_VLLM],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["True", "None"]


# --- the API side ------------------------------------------------------------------------------------------------


class FakeEngineClient:
    """The parts of vLLM's engine client EngineWorkers reads: vllm_config.parallel_config, collective_rpc."""

    def __init__(self, extension: str, replies: dict[str, list] | None = None):
        parallel = SimpleNamespace(worker_extension_cls=extension, _api_process_count=1)
        self.vllm_config = SimpleNamespace(parallel_config=parallel)
        self.replies = replies or {}  # method -> what every worker answers
        self.calls: list[tuple] = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, timeout, args))
        return self.replies.get(method, [])


class Composed(dict, SteerWorkerExtension):  # a user's class composed with ours
    pass


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        (EXTENSION_PATH, True),
        (f"{__name__}.Composed", True),
        ("json.JSONDecoder", False),  # some other class
        ("", False),  # none
        ("no_such_module.Ext", False),
    ],
)
def test_engine_workers_know_whether_the_workers_have_the_extension(extension, expected):
    workers = api_engine.EngineWorkers.of(SimpleNamespace(engine_client=FakeEngineClient(extension)))
    assert workers.have_extension is expected


def test_engine_workers_call_the_extension_methods_by_name():
    stats = [WorkerStats(step_errors=1, tp_rank=0), WorkerStats(step_errors=2, tp_rank=1)]
    outcomes = [LoadOutcome(ok=True, owned=True, layer=3, rows=16), LoadOutcome(ok=True, owned=False)]
    replies = {
        # the workers answer wire dicts; a worker without a steerer answers None for stats: left out
        "steer_plugin_stats": [stats[0].wire(), None, stats[1].wire()],
        "steer_plugin_load": [o.wire() for o in outcomes],
    }
    engine = FakeEngineClient(EXTENSION_PATH, replies)
    workers = api_engine.EngineWorkers.of(SimpleNamespace(engine_client=engine))
    assert asyncio.run(workers.stats(timeout=10)) == stats  # rebuilt as typed messages
    command = LoadCommand("unload", "sae", "s", mac="m")
    assert asyncio.run(workers.load(command, timeout=600)) == outcomes
    assert engine.calls == [
        ("steer_plugin_stats", 10, ()),
        ("steer_plugin_load", 600, (command.wire(),)),  # sent as its wire dict
    ]
    assert type(engine.calls[1][2][0]) is dict
    assert workers.api_process_count == 1
    assert api_engine.EngineWorkers.of(SimpleNamespace()) is None  # before the engine is up


class FakeDataParallelCore:
    """vLLM's multiprocess engine-core client under --data-parallel-size 2: `call_utility_all_async` asks every
    engine core, each answering for its own workers."""

    def __init__(self, per_engine: list[dict[str, list]]):
        self.per_engine = per_engine  # one {method: every worker's answer} per engine core
        self.calls: list[tuple] = []

    async def call_utility_all_async(self, utility, method, timeout, args, kwargs):
        self.calls.append((utility, method, timeout, args, kwargs))
        return [replies.get(method, []) for replies in self.per_engine]


def test_engine_workers_reach_the_workers_of_every_data_parallel_rank():
    """vLLM's collective_rpc answers with the first DP rank's workers only; EngineWorkers asks every engine core
    (so /metrics counts every DP rank, and a load one rank refuses is seen and rolled back)."""
    stats = [WorkerStats(step_errors=1), WorkerStats(step_errors=2)]
    refused = LoadOutcome(ok=False, status=507, error="full")
    core = FakeDataParallelCore(
        [
            {"steer_plugin_stats": [stats[0].wire()], "steer_plugin_load": [LoadOutcome(ok=True).wire()]},
            {"steer_plugin_stats": [stats[1].wire()], "steer_plugin_load": [refused.wire()]},
        ]
    )
    engine = FakeEngineClient(EXTENSION_PATH, {"steer_plugin_stats": [stats[0].wire()]})
    engine.engine_core = core
    workers = api_engine.EngineWorkers.of(SimpleNamespace(engine_client=engine))
    assert asyncio.run(workers.stats(timeout=10)) == stats
    command = LoadCommand("unload", "sae", "s", mac="m")
    assert asyncio.run(workers.load(command, timeout=600)) == [LoadOutcome(ok=True), refused]
    assert engine.calls == []  # never the first-engine-only path
    assert core.calls == [
        ("collective_rpc", "steer_plugin_stats", 10, (), None),
        ("collective_rpc", "steer_plugin_load", 600, (command.wire(),), None),
    ]


# --- steer-serve's flag -------------------------------------------------------------------------------------------


def test_steer_serve_adds_the_extension():
    assert launcher.worker_extension_args(["--model", "m"]) == ["--worker-extension-cls", EXTENSION_PATH]


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_steer_serve_keeps_a_composed_extension(form):
    name = f"{__name__}.Composed"
    args = ["--worker-extension-cls", name] if form == "separate" else [f"--worker-extension-cls={name}"]
    assert launcher.worker_extension_args(args) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("json.JSONDecoder", "does not inherit steer_adapters.vllm.worker.extension.SteerWorkerExtension"),
        ("no_such_module.Ext", "cannot import it"),
    ],
)
def test_steer_serve_refuses_another_extension(name, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        launcher.worker_extension_args(["--worker-extension-cls", name])
    with pytest.raises(SystemExit) as exit_:  # before vLLM starts, with a valid steering config
        launcher.main(["--steer-config", _config(tmp_path), "--model", "m", "--worker-extension-cls", name])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"steer-serve: refusing to start: --worker-extension-cls {name}" in err and message in err


@pytest.fixture
def launched(monkeypatch):
    """What main() would run: ("vllm serve", args) or ("api_server", argv); neither is started."""
    from steer_adapters.vllm.api import serve

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(serve, "run_vllm_serve", lambda args: calls.append(("vllm serve", args)))
    monkeypatch.setattr(launcher.os, "execv", lambda exe, argv: calls.append(("api_server", argv[1:])))
    for name in ("STEER_PLUGIN_CONFIG", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)  # main() sets them: put back as they were after the test
    return calls


def test_steer_serve_runs_a_headless_node_through_vllm_serve(tmp_path, monkeypatch, launched):
    """`python -m vllm.entrypoints.openai.api_server` ignores --headless (it would start a second API server on a
    multi-node server's other nodes): only `vllm serve` runs a node's workers alone."""
    monkeypatch.setenv("STEER_PLUGIN_WIRE_KEY", "k" * 32)
    multi = ["--nnodes", "2", "--master-addr", "leader.example"]
    launcher.main(
        ["--steer-config", _config(tmp_path), "--model", "m", *multi, "--node-rank", "1", "--headless"]
    )
    launcher.main(["--steer-config", _config(tmp_path), "--model", "m", *multi, "--node-rank", "0"])
    (how, args), (leader_how, leader_argv) = launched
    assert how == "vllm serve" and args[:9] == ["--model", "m", *multi, "--node-rank", "1", "--headless"]
    assert launcher._flag_value(args, "--worker-extension-cls") == EXTENSION_PATH  # the workers get ours
    # both nodes' workers load the same config (and key their compile caches on it)
    additional = launcher._flag_value(args, "--additional-config")
    assert json.loads(additional)["steer_plugin"]["fingerprint"]
    assert launcher._flag_value(leader_argv, "--additional-config") == additional
    assert leader_how == "api_server" and leader_argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]


@pytest.mark.parametrize(
    "flags",
    [["--nnodes", "2", "--node-rank", "0"], ["--nnodes=2", "--node-rank=1", "--headless"], ["--headless"]],
)
def test_steer_serve_refuses_a_multi_node_server_without_the_wire_key(
    flags, tmp_path, monkeypatch, capsys, launched
):
    monkeypatch.delenv("STEER_PLUGIN_WIRE_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        launcher.main(["--steer-config", _config(tmp_path), "--model", "m", *flags])
    assert exit_.value.code == 2 and not launched
    err = capsys.readouterr().err
    assert (
        "steer-serve: refusing to start: a server spanning several nodes" in err
        and "STEER_PLUGIN_WIRE_KEY" in err
    )
    # one node: no key needed
    launcher.main(["--steer-config", _config(tmp_path), "--model", "m", "--nnodes", "1"])
    assert len(launched) == 1


def test_steer_serve_leaves_the_cpu_workers_reserved_cores_to_vllm(tmp_path, monkeypatch, launched):
    """The cores vLLM's CPU worker leaves to the API process and engine core are vLLM's default (one per local
    rank on x86) unless the operator sets VLLM_CPU_NUM_OF_RESERVED_CPU: the launcher sets only the KV cache."""
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    launcher.main(["--steer-config", _config(tmp_path), "--model", "m"])
    assert len(launched) == 1 and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # the operator's choice is kept
    launcher.main(["--steer-config", _config(tmp_path), "--model", "m"])
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


# --- the middleware without the extension -------------------------------------------------------------------------

ADMIN_KEY = "k" * 24


def _call(middleware, app_state, method: str, path: str, headers=(), body: bytes = b"") -> tuple[int, bytes]:
    """One ASGI request through `middleware`; (status, body)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": list(headers),
        "app": SimpleNamespace(state=app_state, user_middleware=()),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_middleware_without_the_extension_refuses_loads_and_skips_the_pull(tmp_path, monkeypatch, caplog):
    from steer_adapters.vllm.api.middleware import SteeringMiddleware

    runtime = {"layers": [1], "rows_per_layer": 4, "roots": [str(tmp_path)], "admin_key": ADMIN_KEY}
    monkeypatch.setenv("STEER_PLUGIN_CONFIG", _config(tmp_path, runtime=runtime))
    monkeypatch.delenv("STEER_ADMIN_KEY", raising=False)

    async def vllm_app(scope, receive, send):  # what vLLM's own /metrics would answer
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = SteeringMiddleware(vllm_app)
    engine = FakeEngineClient("")  # plain vLLM without --worker-extension-cls
    state = SimpleNamespace(engine_client=engine)
    status, reply = _call(
        middleware,
        state,
        "POST",
        "/v1/steering/vectors",
        headers=[(b"x-steer-admin-key", ADMIN_KEY.encode())],
        body=json.dumps({"id": "v", "path": str(tmp_path / "v.safetensors"), "layer": 1}).encode(),
    )
    assert status == 503
    assert f"--worker-extension-cls {EXTENSION_PATH}" in json.loads(reply)["error"]["message"]
    with caplog.at_level(logging.WARNING, logger="steer_plugin"):
        assert _call(middleware, state, "GET", "/metrics")[0] == 200
        assert _call(middleware, state, "GET", "/metrics")[0] == 200
    assert engine.calls == []  # nothing was sent to the workers
    assert caplog.text.count("/metrics has no worker figures") == 1  # said once, not per scrape


@pytest.mark.parametrize(
    ("extra", "via_cli"),
    [
        ([], False),
        (["--headless", "--nnodes", "2", "--node-rank", "1"], True),
        (["--api-server-count", "2"], True),
    ],
)
def test_steer_serve_runs_vllm_serve_for_headless_nodes_and_several_api_servers(
    tmp_path, monkeypatch, extra, via_cli
):
    """`--headless` (a multi-node server's other nodes) and `--api-server-count > 1` exist in `vllm serve` only;
    anything else runs the OpenAI server module."""
    from steer_adapters.vllm.api import serve

    config = tmp_path / "steer.json"
    config.write_text("{}")
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(serve, "run_vllm_serve", lambda args: calls.append(("serve", args)))
    monkeypatch.setattr(launcher.os, "execv", lambda exe, cmd: calls.append(("execv", cmd)))
    # main sets the config's path there; a node of a multi-node server needs the shared signing key
    monkeypatch.setattr(launcher.os, "environ", {**launcher.os.environ, "STEER_PLUGIN_WIRE_KEY": "k" * 64})
    launcher.main(["--steer-config", str(config), "--model", "m", *extra])
    ((how, args),) = calls
    assert how == ("serve" if via_cli else "execv")
    assert all(flag in args for flag in extra)
    assert "--worker-extension-cls" in args and "--additional-config" in args
