"""The shared benchmark harness (benchmarks/harness/) and the request bodies of serve_bench's cases, without vLLM:
the servers' environment and commands, the load generator against a small streaming HTTP server of the test's
own, one body builder for timed and check requests, and the vllm-lens cases left out without the side venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the benchmarks import each other as scripts do

from harness.cpu import CpuMonitor, group_cpu_seconds, own_cpu_seconds, proc_jiffies  # noqa: E402
from harness.load import LoadStats, completion_body, run_requests  # noqa: E402
from harness.servers import SERVER_KINDS, ServerSpec, server_env  # noqa: E402

BASE = {"PATH": "/usr/bin", "STEER_PLUGIN_CONFIG": "/x.json", "VLLM_PLUGINS": "steer", "PYTHONPATH": "/repo",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # fmt: skip


def test_server_env_per_kind():
    vanilla, plugin, plain, lens = (server_env(kind, BASE) for kind in SERVER_KINDS)
    for env in (vanilla, plugin, plain, lens):
        assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env and env["PATH"] == "/usr/bin"  # vLLM's default
        assert "STEER_PLUGIN_CONFIG" not in env  # a plugin server gets its config by flag
        assert not any(k.startswith("VLLM_USE_V2") for k in env)  # the runner is vLLM's choice
    assert vanilla["VLLM_PLUGINS"] == "" and vanilla["PYTHONPATH"] == "/repo"
    assert "VLLM_PLUGINS" not in plugin and plugin["PYTHONPATH"] == "/repo"
    # the side venv's servers: nothing of the main venv; vllm-lens disabled in (l0)'s, active in (l)'s
    assert "PYTHONPATH" not in plain and "PYTHONPATH" not in lens
    assert plain["VLLM_LENS_DISABLE"] == "1" and plain["VLLM_PLUGINS"] == ""
    assert "VLLM_LENS_DISABLE" not in lens and "VLLM_PLUGINS" not in lens
    with pytest.raises(ValueError):
        server_env("plugin4", BASE)


def test_reserved_cpus_reach_every_server_of_a_run(tmp_path, monkeypatch):
    """serve_bench --reserved-cpus N: every server of the run starts with VLLM_CPU_NUM_OF_RESERVED_CPU=N (the
    cores its CPU worker's forward leaves to the other processes); without it, vLLM's default, as steer-serve,
    whatever the driver's environment says (scripts/test.sh exports 0)."""
    from harness.servers import Server
    from serve_bench import build_options, parse_args
    from serve_cases import BenchSetup
    from serve_run import SERVERS, Bench

    setup = BenchSetup("demo", 64, 3, ["v1"], [3])
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    for argv, reserved in (([], None), (["--reserved-cpus", "1"], "1"), (["--reserved-cpus", "0"], "0")):
        opts = build_options(parse_args(["--modes", "eager", "--cases", "b_loaded", *argv]))
        configs = dict.fromkeys(SERVERS, tmp_path / "c.json")
        bench = Bench(opts, setup, "/m", configs, tmp_path)
        for server in ("vanilla", "plugin"):
            spec = bench.server_spec(server, "eager")
            env = Server(server, spec, 18001, tmp_path / "log").env
            assert env.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == reserved, (argv, server)


def test_server_commands():
    common = [
        "--model",
        "/m",
        "--served-model-name",
        "bench",
        "--port",
        "18001",
        "--host",
        "127.0.0.1",
        "--seed",
        "0",
    ]
    vanilla = ServerSpec("vanilla", "/m", eager=True).command(18001)
    assert vanilla == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common, "--enforce-eager"]
    plugin = ServerSpec("plugin", "/m", eager=False, steer_config="/c.json", extra_args=("--x",)).command(
        18001
    )
    launcher = [sys.executable, "-m", "steer_adapters.vllm.api.launcher", "--steer-config", "/c.json"]
    assert plugin == [*launcher, *common, "--x"]
    lens = ServerSpec("lens", "/m", eager=True, lens_venv="/venv").command(18001)
    assert lens[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    with pytest.raises(ValueError):
        ServerSpec("plugin", "/m", eager=True).command(1)
    with pytest.raises(ValueError):
        ServerSpec("lens_plain", "/m", eager=True).command(1)


def test_one_body_builder_for_timed_and_check_requests():
    from serve_cases import PROMPTS, BenchSetup, Requests

    requests = Requests(BenchSetup("demo", 64, 3, ["v1"], [3]), lens_wire='[{"layer_indices": [3]}]')
    timed = requests.body("l_lens_vector", 1, 8, "s1")
    check = requests.body("l_lens_vector", 1, 12, "s2", check=True)
    assert timed["vllm_xargs"] == check["vllm_xargs"] == {"apply_steering_vectors": requests.lens_wire}
    assert timed["prompt"] == check["prompt"] == PROMPTS[1]
    assert timed["stream"] and timed["stream_options"] == {"include_usage": True} and "logprobs" not in timed
    assert "stream" not in check and check["logprobs"] == 1 and check["max_tokens"] == 12
    for body in (timed, check):
        assert body["ignore_eos"] and body["temperature"] == 0.0 and "steering" not in body
    plain = requests.body("l0_lens_plain", 0, 8, "s3", check=True)
    assert "vllm_xargs" not in plain and "steering" not in plain
    add = requests.body("c_add1", 0, 8, "s4")
    assert add["steering"]["features"][0]["op"] == "add" and "vllm_xargs" not in add
    # (e)'s configs cycle across the whole run, not per unit
    first = [requests.body("e_distinct256", i, 8, "s")["steering"] for i in range(2)]
    again = Requests(requests.setup).body("e_distinct256", 0, 8, "s")["steering"]
    assert first[0] != first[1] and again == first[0]
    assert completion_body("bench", "p", 4, "salt") == {
        "model": "bench", "prompt": "p", "max_tokens": 4, "ignore_eos": True, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "cache_salt": "salt",
    }  # fmt: skip


class _Streamer(BaseHTTPRequestHandler):
    """A /v1/completions that streams `max_tokens` chunks 20 ms apart, then the usage; "fail" in the prompt: 500."""

    in_flight = 0
    most = 0
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "fail" in body["prompt"]:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        with _Streamer.lock:
            _Streamer.in_flight += 1
            _Streamer.most = max(_Streamer.most, _Streamer.in_flight)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(body["max_tokens"]):
            time.sleep(0.02)
            choice = {"index": 0, "text": f"t{i}", "steering": {"tokens": [{"pos": i}]}}
            self.wfile.write(b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n")
            self.wfile.flush()
        usage = {"completion_tokens": body["max_tokens"]}
        self.wfile.write(
            b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n"
        )
        # leave before [DONE]: a client that has read it may send its next request before we get here
        with _Streamer.lock:
            _Streamer.in_flight -= 1
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def streamer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Streamer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    server.shutdown()
    server.server_close()


def test_load_generator_times_streamed_requests(streamer):
    bodies = [completion_body("bench", f"p{i}", 4, f"s{i}") for i in range(6)]
    bodies.append(completion_body("bench", "fail", 4, "s"))
    load = run_requests(streamer, bodies, concurrency=2, timeout_s=60)
    assert _Streamer.most == 2  # never more than `concurrency` in flight
    assert len(load.results) == 7 and load.elapsed_s > 0
    ok = [r for r in load.results if r.ok]
    assert len(ok) == 6
    for r in ok:
        assert r.tokens == 4 and r.chunks == 4 and len(r.gaps) == 3
        assert r.ttft is not None and r.ttft >= 0.015
        # (20 ms apart when sent; one gap can arrive shorter, the one before it longer: their sum holds)
        assert all(g > 0 for g in r.gaps) and sum(r.gaps) >= 0.045
        assert r.extra_fields == {"steering"} and r.inspect_tokens == 4
    stats = LoadStats.of(load)
    assert (stats.requests, stats.ok, stats.errors, stats.output_tokens) == (7, 6, 1, 24)
    assert stats.first_error.startswith("HTTP 500") and stats.tokens_per_request == [4]
    assert stats.tok_s == pytest.approx(24 / load.elapsed_s, rel=1e-3)
    assert stats.itl_p50_ms >= 15 and stats.ttft_p99_ms >= stats.ttft_p50_ms
    assert stats.inspect_sample == {"pos": 0} and stats.extra_response_fields == ["steering"]
    assert list(stats.as_dict())[:4] == ["requests", "ok", "errors", "first_error"]


def test_cpu_monitor_counts_its_own_process_apart():
    assert proc_jiffies(os.getpid())[0] == os.getpgid(0)
    assert proc_jiffies(2**22 + 1) is None  # no such process
    monitor = CpuMonitor()
    a = monitor.snapshot()
    end = time.thread_time() + 0.2
    while time.thread_time() < end:  # our own CPU: not counted as other processes'
        pass
    b = monitor.snapshot()
    assert b.own - a.own >= 10 and CpuMonitor.foreign_cores(a, b) >= 0.0


def test_cpu_per_process_group_by_kind_and_of_the_load_generator():
    """A server's CPU is its process group's (every process of it), vLLM's engine and worker processes
    (named VLLM::...) apart from the rest (the API process); the load generator's is this process's."""
    burn = "import time\nend = time.thread_time() + 0.3\nwhile time.thread_time() < end: pass\ntime.sleep(30)"
    named = "import setproctitle\nsetproctitle.setproctitle('VLLM::Worker')\n" + burn
    # the "API process" starts the "worker", which inherits its process group
    spawn = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {named!r}])\n" + burn
    api = subprocess.Popen([sys.executable, "-c", spawn], start_new_session=True)
    try:
        deadline = time.time() + 20
        while min(group_cpu_seconds(api.pid)) < 0.25 and time.time() < deadline:
            time.sleep(0.05)
        used = group_cpu_seconds(api.pid)
        assert 0.25 <= used.api < 5 and 0.25 <= used.engine < 5, used  # their 0.3 s each, not this process's
        assert group_cpu_seconds(2**22 + 1) == (0.0, 0.0)  # no such group
    finally:
        os.killpg(api.pid, 9)
        api.wait()
    before = own_cpu_seconds()
    end = time.thread_time() + 0.2
    while time.thread_time() < end:
        pass
    assert own_cpu_seconds() - before >= 0.15


def test_lens_cases_are_left_out_without_the_side_venv(tmp_path, capsys):
    import serve_bench

    cases, skipped = serve_bench.select_cases(None, ["eager"], str(tmp_path / "no-venv"))
    lens = ["l0_lens_plain", "l1_lens_loaded", "l_lens_vector"]
    assert sorted(skipped) == lens and not set(lens) & set(cases) and "c_add1" in cases
    assert "skipping cases l0_lens_plain, l1_lens_loaded, l_lens_vector" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not ready"):
        serve_bench.select_cases("c_add1,l_lens_vector", ["eager"], str(tmp_path / "no-venv"))


def test_the_monitoring_cases_count_what_their_servers_logged(tmp_path):
    """(j) and (k) send plain requests to a server that monitors all traffic; the run counts each server's
    monitoring log, so a server that read nothing cannot pass for a cheap one."""
    from serve_cases import CASE_BY_KEY, MONITORING_SERVERS, PROBES, monitoring_log

    for server, (case, _) in MONITORING_SERVERS.items():
        assert CASE_BY_KEY[case].server == server
    assert monitoring_log(tmp_path) == {}  # neither ran
    logs = {case: tmp_path / log for case, log in MONITORING_SERVERS.values()}
    every = {f"p{k}": {"on": {"max": 0.5}} for k in range(PROBES)}
    lines = [
        {"event": "probes", "request_id": "a", "probes": every},
        {"event": "probes", "request_id": "b", "probes": {"p0": every["p0"]}},  # 1 of 16: not complete
        {"event": "abort", "request_id": "c"},  # not a probes line
    ]
    logs["j_monitor16"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    lines = [
        {"request_id": "a", "sae": "demo", "num_tokens": 8, "top_features": [{"index": 3, "tokens": 2}]},
        {"request_id": "b", "sae": "demo", "num_tokens": 0, "top_features": []},  # read nothing
    ]
    logs["k_monitor_sae"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert monitoring_log(tmp_path) == {
        "j_monitor16": {"lines": 2, "complete": 1},
        "k_monitor_sae": {"lines": 2, "complete": 1},
    }


def test_every_cases_bodies_plan_against_its_servers_config(tmp_path):
    """What the serve_bench smoke run leaves out (it starts two of the five servers): every case's configs load as
    their servers load them at start, and every case's request bodies are planned by the plugin's own planning
    against the config of the server they go to, steering what the case says it steers."""
    from serve_cases import CASES, MONITORING_SERVERS, PROBES, Requests, write_configs

    from steer_demo.build_assets import asset_paths
    from steer_plugin.catalog import load_assets
    from steer_plugin.config import load_config_file
    from steer_plugin.request.plan import Endpoint, plan_request
    from steer_plugin.request.schema import parse_spec

    from ..tools import skip_or_fail

    paths = asset_paths()
    if not (paths.sae_dir / "cfg.json").is_file() or not (paths.model_dir / "config.json").is_file():
        skip_or_fail("demo assets not built (python -m steer_demo.build_assets)")
    setup, configs = write_configs(
        tmp_path, str(paths.model_dir), str(paths.sae_dir), str(paths.labels_path), 0
    )
    loaded = {
        s: load_assets(load_config_file(configs[s])) for s in ("plugin", "plugin4", *MONITORING_SERVERS)
    }
    assert (
        set(loaded["plugin"].probes)
        == set(loaded["plugin_mon"].config.monitoring.probes)
        == {f"p{k}" for k in range(PROBES)}
    )
    assert set(loaded["plugin_sae_mon"].config.monitoring.saes) == {"demo"}
    requests = Requests(setup)
    planned = {}
    for case in (c for c in CASES if not c.side_venv):
        plans = planned[case.key] = []
        for i in range(4):
            body = requests.body(case.key, i, 8, f"salt-{i}")
            if "steering" in body:
                assets = loaded[case.server]  # (a body with steering never goes to plain vLLM: KeyError)
                spec = parse_spec(body["steering"])
                plans.append(plan_request(spec, assets.catalog(), assets.config, Endpoint.of(body)))
    steered = {k: [len(p.ops) for p in plans] for k, plans in planned.items()}
    assert steered == {
        "a_vanilla": [], "b_loaded": [], "c_add1": [1] * 4, "d_mixed50": [1, 1], "e_distinct256": [1] * 4,
        "f_clamp8": [8] * 4, "g_4layers": [4] * 4, "g0_4layers_loaded": [], "h_inspect": [0] * 4,
        "i_probes16": [0] * 4, "j_monitor16": [], "k_monitor_sae": [],
    }  # fmt: skip
    assert {op.layer for p in planned["g_4layers"] for op in p.ops} == set(setup.vector_layers)
    assert all(p.inspected == ("demo",) and p.inspect.top_k == 5 for p in planned["h_inspect"])
    assert all(p.probes == tuple(f"p{k}" for k in range(PROBES)) for p in planned["i_probes16"])
    assert len({p.ops[0].index for p in planned["e_distinct256"]}) == 4  # distinct features
