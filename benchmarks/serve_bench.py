#!/usr/bin/env python
"""Steering overhead against plain vLLM, measured side by side over the real OpenAI HTTP API.

    python benchmarks/serve_bench.py                       # full run: compile + eager, ~15-20 min on 2 CPU cores
    python benchmarks/serve_bench.py --smoke --out /tmp/x  # eager only, a few requests per case, ~2 min
    python benchmarks/serve_bench.py --modes eager --rounds 5

Per mode (`compile` = vLLM's default, `eager` = --enforce-eager) it starts, on the same model with the same
flags, three servers side by side on loopback ports 18000-18999:
  - `vanilla`: `python -m vllm.entrypoints.openai.api_server` with VLLM_PLUGINS="" (the plugin is not loaded);
  - `plugin`:  `python -m steer_adapters.vllm.launcher` with the demo SAE only (one steered layer);
  - `plugin4`: the launcher with the demo SAE plus raw steering vectors on 4 layers (case g).
Only one server is under load at any time (an idle server uses <1% of a core); the cases of every round run
in a shuffled order, so slow drifts of a shared machine hit vanilla and plugin cases alike. Each case runs at
each concurrency with streaming requests of a fixed length (`max_tokens`, `ignore_eos`) and a unique
`cache_salt` per request (no prefix-cache hits for anyone). Reported: output tokens/s, TTFT and inter-token
latency (gap between streamed chunks) p50/p99; medians over rounds with min/max, and per-round ratios against
the vanilla unit of the same round.

CPU used by processes other than these servers and this client is measured around every unit (from
/proc/stat); a disturbed unit is waited out and retried, and the count is reported.

Writes OUT.json (everything, raw units included), OUT.md (tables) and OUT.png (if matplotlib is installed).
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

from machine import cpu_model, git_state

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu-smollm2"
SERVED_NAME = "bench"
PORT_RANGE = (18000, 18999)
HZ = os.sysconf("SC_CLK_TCK")

PROMPTS = [
    "Tell me about the Golden Gate Bridge.",
    "How do I bake a loaf of sourdough bread?",
    "Explain the rules of basketball in a few sentences.",
    "Write a short poem about the sea at night.",
    "What causes the seasons on Earth?",
    "Describe a busy market in a small town on a Saturday morning.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue? Explain it to a child.",
    "Summarise the plot of a detective story you make up.",
    "What is a suspension bridge and how does it carry its load?",
    "List some healthy breakfast ideas.",
    "Explain how a computer stores numbers.",
    "Write a letter to a friend about a recent trip to the mountains.",
    "What are the main differences between cats and dogs as pets?",
    "How does a bicycle stay upright when it moves?",
    "Describe the life cycle of a butterfly.",
]

# --- cases ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    server: str  # vanilla | plugin | plugin4
    title: str
    target_loss: float | None = None  # max throughput loss vs vanilla (fraction), None = no target


CASES = [
    Case("a_vanilla", "vanilla", "(a) plain vLLM (plugin not loaded)"),
    Case("b_loaded", "plugin", "(b) plugin loaded, no steering", 0.01),
    Case("c_add1", "plugin", "(c) every request: one `add`, one layer", 0.02),
    Case("d_mixed50", "plugin", "(d) 50% of requests steered (add), 50% plain"),
    Case(
        "e_distinct256", "plugin", "(e) distinct per-request configs (pool of 256 feature/value pairs)", 0.03
    ),
    Case("f_clamp8", "plugin", "(f) every request: clamp of 8 features", 0.05),
    Case("g_4layers", "plugin4", "(g) every request: raw vectors on 4 layers"),
    Case("g0_4layers_loaded", "plugin4", "(g0) 4-layer config loaded, no steering (reference for g)"),
    Case("h_inspect", "plugin", '(h) `"inspect": {"top_k": 5}` on every request'),
]
CASE_BY_KEY = {c.key: c for c in CASES}
INSPECT_SLACK = 1.5  # target for (h): loss <= 1.5 x the SAE's share of model FLOPs


@dataclass
class BenchSetup:
    """What the request bodies refer to."""

    sae_id: str
    d_sae: int
    sae_layer: int
    vector_ids: list[str]
    vector_layers: list[int]


def steering_for(case: str, i: int, setup: BenchSetup, counter: list[int]) -> dict | None:
    """The `steering` field of request i of a unit of this case (None: no field)."""
    add = {"features": [{"sae": setup.sae_id, "index": 7, "op": "add", "value": 4.0}]}
    if case in ("a_vanilla", "b_loaded", "g0_4layers_loaded"):
        return None
    if case == "c_add1":
        return add
    if case == "d_mixed50":
        return add if i % 2 == 0 else None
    if case == "e_distinct256":
        j = counter[0] % 256  # cycles through 256 distinct (feature, value) pairs across the whole run
        counter[0] += 1
        index = (j * 97 + 11) % setup.d_sae
        return {
            "features": [{"sae": setup.sae_id, "index": index, "op": "add", "value": 1.0 + 0.25 * (j % 16)}]
        }
    if case == "f_clamp8":
        feats = [
            {"sae": setup.sae_id, "index": (13 * k + 5) % setup.d_sae, "op": "clamp", "value": 3.0}
            for k in range(8)
        ]
        return {"features": feats}
    if case == "g_4layers":
        return {"vectors": [{"name": v, "scale": 4.0} for v in setup.vector_ids]}
    if case == "h_inspect":
        return {"inspect": {"top_k": 5}}
    raise KeyError(case)


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

    def _env(self, kind: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        )
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # what the plugin selects; same for vanilla
        env.pop("STEER_PLUGIN_CONFIG", None)
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
        return [
            sys.executable,
            "-m",
            "steer_adapters.vllm.launcher",
            "--steer-config",
            str(self.configs[kind]),
            *common,
        ]

    def start_servers(self, mode: str) -> dict[str, Server]:
        kinds = sorted(
            {CASE_BY_KEY[c].server for c in self.opts.cases}, key=["vanilla", "plugin", "plugin4"].index
        )
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
            out.append(body)
        return out

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
            units = [(case, conc) for case in self.opts.cases for conc in self.opts.concurrencies]
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


# --- analysis ----------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


METRICS = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def _paired(mine: dict, base: dict, metric: str) -> dict | None:
    vals = [
        mine[r][metric] / base[r][metric]
        for r in mine
        if r in base and base[r][metric] and mine[r][metric] is not None
    ]
    return _stats(vals)


# The unsteered unit on the same server as each steered case: the steering's own cost, apart from loading.
LOADED_REFERENCE = {"g_4layers": "g0_4layers_loaded"}


def summarise(units: list[dict], modes: list[str], concs: list[int], cases: list[str]) -> dict:
    """Per (mode, case, concurrency): medians over rounds, and per-round ratios against vanilla's unit of the
    same round (and against the same server's unsteered unit: b_loaded, or g0 for g)."""
    out: dict = {}
    for mode in modes:
        for conc in concs:

            def by_round(case: str) -> dict:
                return {
                    u["round"]: u
                    for u in units
                    if u["mode"] == mode and u["case"] == case and u["concurrency"] == conc  # noqa: B023
                }

            base = by_round("a_vanilla")
            for case in cases:
                mine = by_round(case)
                if not mine:
                    continue
                entry = {m: _stats([u[m] for u in mine.values()]) for m in METRICS}
                entry["ratio_vs_vanilla"] = {m: _paired(mine, base, m) for m in METRICS}
                ref = LOADED_REFERENCE.get(case, "b_loaded")
                entry["ratio_vs_loaded"] = (
                    {m: _paired(mine, by_round(ref), m) for m in METRICS}
                    if case not in ("a_vanilla", ref) and CASE_BY_KEY[case].server != "vanilla"
                    else None
                )
                entry["loaded_reference"] = ref
                entry["errors"] = sum(u["errors"] for u in mine.values())
                entry["disturbed_units"] = sum(1 for u in mine.values() if u["disturbed"])
                entry["inspect_tokens"] = sum(u.get("inspect_tokens", 0) for u in mine.values())
                entry["output_tokens"] = sum(u["output_tokens"] for u in mine.values())
                entry["extra_response_fields"] = sorted(
                    set().union(*(u["extra_response_fields"] for u in mine.values()))
                )
                out.setdefault(mode, {}).setdefault(str(conc), {})[case] = entry
    return out


def model_flops(model_dir: str, d_sae: int, context: int) -> dict:
    """Forward FLOPs per token of a Llama-like model (matmuls + attention over `context`) and of one SAE encode."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, n_layers, inter, vocab = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or d // heads
    per_layer = (
        2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter) + 4 * context * heads * hd
    )
    model = n_layers * per_layer + 2 * d * vocab
    sae = 2 * d * d_sae  # full encode (x @ W_enc); top-k selection and decode of k rows are negligible
    return {
        "model_flops_per_token": model,
        "sae_encode_flops_per_token": sae,
        "sae_share": sae / model,
        "context": context,
    }


def evaluate_targets(summary: dict, modes: list[str], concs: list[int], flops: dict) -> list[dict]:
    rows = []
    for mode in modes:
        for conc in concs:
            cell = summary.get(mode, {}).get(str(conc), {})
            for case in CASES:
                target = case.target_loss
                note = ""
                if case.key == "h_inspect":
                    target = INSPECT_SLACK * flops["sae_share"]
                entry = cell.get(case.key)
                if target is None or entry is None or entry["ratio_vs_vanilla"]["tok_s"] is None:
                    continue
                r = entry["ratio_vs_vanilla"]["tok_s"]
                loss = 1.0 - r["median"]
                spread = (r["max"] - r["min"]) / 2
                status = "met" if loss <= target else "MISSED"
                if case.key == "h_inspect" and not entry.get("inspect_tokens"):
                    status = "n/a"
                    note = "inspect accepted but ignored: no per-token features in the response"
                elif status == "MISSED" and loss - target <= spread:
                    note = "within the round-to-round spread"
                if r["n"] < 2:
                    note = (note + "; " if note else "") + "one round: no spread"
                disturbed = entry["disturbed_units"] + (cell.get("a_vanilla") or {}).get("disturbed_units", 0)
                if disturbed:
                    note = (note + "; " if note else "") + f"{disturbed} disturbed unit(s)"
                loaded = (entry.get("ratio_vs_loaded") or {}).get("tok_s")
                rows.append(
                    {
                        "mode": mode,
                        "concurrency": conc,
                        "case": case.key,
                        "target_loss": target,
                        "loss": loss,
                        "loss_vs_loaded": None if loaded is None else 1.0 - loaded["median"],
                        "ratio_min": r["min"],
                        "ratio_max": r["max"],
                        "status": status,
                        "note": note,
                    }
                )
    return rows


# --- reports -------------------------------------------------------------------------------------------------------


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def write_markdown(path: Path, result: dict, notes: str | None) -> None:
    m, o = result["machine"], result["options"]
    startups = ", ".join("{}/{} {}s".format(s["mode"], s["server"], s["ready_s"]) for s in result["startups"])
    lines = [
        "# Steering overhead vs plain vLLM (serve_bench)",
        "",
        f"- Date: {m['date_utc']}; git {m['git_commit'] or '?'}"
        + (
            f" with {len(m['uncommitted_engine_files'])} uncommitted engine/adapter files"
            if m.get("uncommitted_engine_files")
            else ""
        ),
        f"- Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['mem_gib']} GiB; "
        f"{m['platform']}, Python {m['python']}",
        f"- vLLM {m['vllm']}, torch {m['torch']}",
        f"- Model: `{Path(result['asset_sources']['model']).name}`; SAE `{Path(result['asset_sources']['sae']).name}` "
        f"(from {result['asset_sources']['via']}, copied for the run; {result['setup']['d_sae']} features, layer "
        f"{result['setup']['sae_layer']}); raw vectors for (g) on layers {result['setup']['vector_layers']} "
        "(random unit vectors made by the harness: there is one demo SAE)",
        f"- Modes: {', '.join(o['modes'])}; concurrency {o['concurrencies']}; requests per unit "
        f"{o['requests']}; max_tokens {o['max_tokens']} with ignore_eos; {o['rounds']} round(s), case order shuffled "
        "every round; streaming /v1/completions over loopback, greedy, a unique cache_salt per request.",
        "- Ratios are per round against the vanilla unit of the same round, then the median [min–max] over rounds. "
        "Throughput ratio < 1 is a loss; latency ratio > 1 is a loss. `× (b)` compares a steered case with the "
        "unsteered unit on the same plugin server ((b); (g0) for (g)): the steering's own cost, without whatever "
        "loading the plugin changes.",
        f"- Server start-up to /health (servers of a mode start together): {startups}",
        f"- Other processes' CPU during units: median {result['noise']['foreign_median']:.2f} cores, max "
        f"{result['noise']['foreign_max']:.2f}; disturbed units (>= {o['quiet_threshold']} cores after "
        f"{o['max_retries']} retries): {result['noise']['disturbed_units']}/{result['noise']['units']}; "
        f"waited {result['noise']['waited_s']:.0f}s for quiet and re-ran {result['noise']['retried_s']:.0f}s of units "
        f"(budget {o['noise_budget_s']:.0f}s).",
        f"- Wall time of the run: {result['wall_s'] / 60:.1f} min.",
        "",
    ]
    summary = result["summary"]
    for mode in o["modes"]:
        lines += [f"## Ratios against vanilla: {mode}", ""]
        head = "| case |"
        sep = "|---|"
        for c in o["concurrencies"]:
            head += f" c={c} tok/s × vanilla | c={c} tok/s × (b) | c={c} TTFT p50 × | c={c} ITL p50 × | c={c} ITL p99 × |"
            sep += "---:|---:|---:|---:|---:|"
        lines += [head, sep]
        for case in CASES:
            if case.key not in o["cases"]:
                continue
            row = f"| {case.title} |"
            for c in o["concurrencies"]:
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                if e is None:
                    row += " – | – | – | – | – |"
                    continue
                rv = e["ratio_vs_vanilla"]
                t = rv["tok_s"]
                tp = "–" if t is None else f"{t['median']:.3f} [{t['min']:.3f}–{t['max']:.3f}]"
                tl = (e.get("ratio_vs_loaded") or {}).get("tok_s")
                tlp = "–" if tl is None else f"{tl['median']:.3f} [{tl['min']:.3f}–{tl['max']:.3f}]"
                row += f" {tp} | {tlp} | {_f(rv['ttft_p50_ms'] and rv['ttft_p50_ms']['median'])} |"
                row += f" {_f(rv['itl_p50_ms'] and rv['itl_p50_ms']['median'])} | {_f(rv['itl_p99_ms'] and rv['itl_p99_ms']['median'])} |"
            lines.append(row)
        lines += ["", f"### Absolute numbers: {mode} (median over rounds)", ""]
        lines += [
            "| case | conc | tok/s [min–max] | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in CASES:
            for c in o["concurrencies"]:
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                if e is None:
                    continue
                t = e["tok_s"]
                lines.append(
                    f"| {case.key} | {c} | {t['median']:.1f} [{t['min']:.1f}–{t['max']:.1f}] | "
                    f"{_f(e['ttft_p50_ms'] and e['ttft_p50_ms']['median'], '{:.1f}')} | {_f(e['ttft_p99_ms'] and e['ttft_p99_ms']['median'], '{:.1f}')} | "
                    f"{_f(e['itl_p50_ms'] and e['itl_p50_ms']['median'], '{:.1f}')} | {_f(e['itl_p99_ms'] and e['itl_p99_ms']['median'], '{:.1f}')} | {e['errors']} |"
                )
        lines.append("")
    fl = result["flops"]
    lines += [
        "## Targets (throughput loss vs vanilla)",
        "",
        f"(h)'s target is {INSPECT_SLACK}× the SAE's share of model FLOPs: a full encode is {fl['sae_encode_flops_per_token'] / 1e6:.1f} "
        f"MFLOP/token against {fl['model_flops_per_token'] / 1e6:.0f} MFLOP/token for the model (context {fl['context']}), "
        f"a share of {fl['sae_share'] * 100:.2f}%, so the target is {INSPECT_SLACK * fl['sae_share'] * 100:.2f}%.",
        "",
        "| mode | conc | case | target | loss vs vanilla (median) | per-round ratio range | status | loss vs (b) | note |",
        "|---|---:|---|---:|---:|---|---|---:|---|",
    ]
    for t in result["targets"]:
        lb = "–" if t.get("loss_vs_loaded") is None else f"{t['loss_vs_loaded'] * 100:+.2f}%"
        lines.append(
            f"| {t['mode']} | {t['concurrency']} | {t['case']} | ≤{t['target_loss'] * 100:.1f}% | {t['loss'] * 100:+.2f}% | "
            f"{t['ratio_min']:.3f}–{t['ratio_max']:.3f} | {t['status']} | {lb} | {t['note']} |"
        )
    lines += ["", "## Inspect (h)", "", result["inspect_note"], ""]
    if result.get("plot"):
        lines += [f"![throughput ratios]({Path(result['plot']).name})", ""]
    else:
        lines += [f"(plot skipped: {result.get('plot_skipped')})", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, result: dict) -> str | None:
    """A bar chart of throughput ratios; returns a reason when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `bench` extra)"
    o, summary = result["options"], result["summary"]
    cases = [c for c in CASES if c.key in o["cases"] and c.key != "a_vanilla"]
    fig, axes = plt.subplots(
        1, len(o["modes"]), figsize=(6.5 * len(o["modes"]), 4.8), squeeze=False, sharey=True
    )
    width = 0.8 / len(o["concurrencies"])
    ratios = [
        v
        for mode in o["modes"]
        for cell in summary.get(mode, {}).values()
        for key, e in cell.items()
        if key != "a_vanilla" and e["ratio_vs_vanilla"]["tok_s"]
        for v in (e["ratio_vs_vanilla"]["tok_s"]["min"], e["ratio_vs_vanilla"]["tok_s"]["max"])
    ] or [1.0]
    lowest, highest = min(ratios), max(ratios)
    for ax, mode in zip(axes[0], o["modes"], strict=True):
        for j, c in enumerate(o["concurrencies"]):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                t = e and e["ratio_vs_vanilla"]["tok_s"]
                if not t:
                    continue
                xs.append(i + (j - (len(o["concurrencies"]) - 1) / 2) * width)
                ys.append(t["median"])
                lo.append(t["median"] - t["min"])
                hi.append(t["max"] - t["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"concurrency {c}")
        for i, case in enumerate(cases):
            target = case.target_loss
            if case.key == "h_inspect":
                target = INSPECT_SLACK * result["flops"]["sae_share"]
            if target is not None:
                ax.hlines(1 - target, i - 0.45, i + 0.45, colors="red", linestyles="dashed", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.key.split("_", 1)[0] for c in cases])
        ax.set_title(f"{mode}: output tok/s relative to vanilla")
        ax.set_ylim(min(0.8, lowest - 0.05), max(1.1, highest + 0.05))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("throughput ratio (median, min–max over rounds)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.text(
        0.01,
        0.01,
        "red dashes: targets. "
        + "; ".join(f"{c.key.split('_', 1)[0]}={c.key.split('_', 1)[1]}" for c in cases),
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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


def write_configs(
    workdir: Path, model_dir: str, sae_dir: str, labels: str | None, seed: int
) -> tuple[BenchSetup, dict[str, Path]]:
    import torch
    from safetensors.torch import save_file

    from steer_plugin.catalog import load_assets
    from steer_plugin.config import SAESource, SteerConfig

    sae_entry = {"id": "demo", "path": sae_dir}
    if labels and Path(labels).exists():
        sae_entry["labels"] = labels
    probe = load_assets(SteerConfig(saes=[SAESource(**sae_entry)])).saes["demo"]
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n_layers, d_model = cfg["num_hidden_layers"], cfg["hidden_size"]
    layer = probe.layer
    others = [round(n_layers * f) for f in (1 / 6, 1 / 3, 2 / 3, 5 / 6)]
    vector_layers = sorted({layer, *[x for x in others if x != layer]})[:4]
    while len(vector_layers) < 4:  # tiny models
        vector_layers = sorted(set(vector_layers) | {len(vector_layers)})
    g = torch.Generator().manual_seed(seed)
    vectors = []
    for L in vector_layers:
        v = torch.randn(d_model, generator=g)
        path = workdir / f"vector-l{L}.safetensors"
        save_file({"vector": (v / v.norm()).contiguous()}, str(path))
        vectors.append({"id": f"v{L}", "path": str(path), "layer": L})
    configs = {"plugin": workdir / "steer-1layer.json", "plugin4": workdir / "steer-4layers.json"}
    configs["plugin"].write_text(json.dumps({"saes": [sae_entry]}, indent=2))
    configs["plugin4"].write_text(json.dumps({"saes": [sae_entry], "vectors": vectors}, indent=2))
    setup = BenchSetup("demo", probe.sae.d_sae, layer, [v["id"] for v in vectors], vector_layers)
    return setup, configs


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
    p.add_argument("--cases", help="comma list of case keys (default all): " + ",".join(c.key for c in CASES))
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
    cases = (args.cases or ",".join(c.key for c in CASES)).split(",")
    for c in cases:
        if c not in CASE_BY_KEY:
            raise SystemExit(f"unknown case {c!r}")
    if "a_vanilla" not in cases:
        cases.insert(0, "a_vanilla")
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
        start_timeout={"compile": 900.0, "eager": 480.0},  # three servers start side by side on 2 cores
        extra_vllm_args=list(args.vllm_arg),
        seed=args.seed,
    )


def inspect_note(summary: dict, units: list[dict]) -> str:
    cells = [cell["h_inspect"] for mode in summary.values() for cell in mode.values() if "h_inspect" in cell]
    if not cells:
        return "(h) was not run."
    errors = sum(c["errors"] for c in cells)
    if errors:
        return f"`inspect` requests failed ({errors} errors); see first_error in the JSON's units."
    records = sum(c.get("inspect_tokens", 0) for c in cells)
    tokens = sum(c.get("output_tokens", 0) for c in cells)
    fields = sorted({f for c in cells for f in c["extra_response_fields"]})
    if not records:
        return (
            'The server accepted `"steering": {"inspect": {"top_k": 5}}` (HTTP 200) but returned no per-token '
            f"features (extra chunk fields seen: {fields or 'none'}), so (h) measures plain serving through the "
            "plugin and its target cannot be judged."
        )
    sample = next(
        (u["inspect_sample"] for u in units if u["case"] == "h_inspect" and u.get("inspect_sample")), None
    )
    text = json.dumps(sample)[:400] if sample is not None else "?"
    return (
        f"Inspect is served: {records} per-token feature records came back in `choices[].steering.tokens` for "
        f"{tokens} generated tokens of (h). First record: `{text}`."
    )


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
        "cases": {c.key: {"title": c.title, "server": c.server, "target_loss": c.target_loss} for c in CASES},
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


def write_reports(result: dict, out: Path, notes_path: Path | None) -> None:
    """(Re)compute the summary, targets and inspect note from the raw units, and write OUT.json/.md/.png."""
    o = result["options"]
    result["summary"] = summarise(result["units"], o["modes"], o["concurrencies"], o["cases"])
    result["targets"] = evaluate_targets(result["summary"], o["modes"], o["concurrencies"], result["flops"])
    result["inspect_note"] = inspect_note(result["summary"], result["units"])
    png = out.with_suffix(".png")
    skipped = write_plot(png, result)
    result["plot"] = None if skipped else png.name
    result["plot_skipped"] = skipped
    if skipped:
        print(f"plot skipped: {skipped}", flush=True)
    notes_path = notes_path or out.parent / f"{out.name}-notes.md"
    notes = notes_path.read_text() if notes_path.exists() else None
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(out.with_suffix(".md"), result, notes)
    print(
        f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}" + ("" if skipped else f", {png}"),
        flush=True,
    )


def rerender(path: str, out: str | None, notes: str | None) -> int:
    """--from-json: rewrite the reports of an earlier run (new analysis code, or notes added since)."""
    result = json.loads(Path(path).read_text())
    write_reports(result, Path(out) if out else Path(path).with_suffix(""), Path(notes) if notes else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
