"""The benchmarks' OpenAI-compatible servers: what each kind runs with (`server_env`, `ServerSpec`), starting
them side by side on free loopback ports, waiting for /health, and stopping every one of them on the way out.

Kinds (`SERVER_KINDS`), the same model and flags for all:
  - `vanilla`:    `python -m vllm.entrypoints.openai.api_server` with VLLM_PLUGINS="" (no plugin loaded: stock vLLM);
  - `plugin`:     `python -m steer_adapters.vllm.api.launcher --steer-config PATH` (`steer-serve`);
  - `lens_plain`, `lens`: vLLM from the vllm-lens side venv, vllm-lens disabled or active (vllm_lens_side.py).
Each server runs in its own process group (API server, engine core, workers), so that stopping it stops all of
them, and so that the CPU monitor (cpu.py) can tell its processes from the rest of the machine.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import vllm_lens_side as lens_side

SERVER_KINDS = ("vanilla", "plugin", "lens_plain", "lens")
SERVED_NAME = "bench"
PORT_RANGE = (18000, 18999)
# What every benchmark server (and sched_probe's in-process engine) runs with on the CPU machine.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
RESERVED_CPUS_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def server_env(
    kind: str, base: Mapping[str, str] | None = None, reserved_cpus: int | None = None
) -> dict[str, str]:
    """The environment of a server of this kind, from `base` (default: this process's): BASE_ENV, no
    STEER_PLUGIN_CONFIG (a plugin server gets its config by flag), and no plugin at all for `vanilla`.
    `reserved_cpus`: the cores vLLM's CPU worker leaves to the API process and engine core (its
    VLLM_CPU_NUM_OF_RESERVED_CPU); None: vLLM's default, as `steer-serve` (one per local rank on x86); 0: the
    forward's threads on every core."""
    if kind not in SERVER_KINDS:
        raise ValueError(f"unknown server kind {kind!r}; one of {SERVER_KINDS}")
    env = dict(os.environ if base is None else base)
    env.update(BASE_ENV)
    env.pop(RESERVED_CPUS_ENV, None)
    if reserved_cpus is not None:
        env[RESERVED_CPUS_ENV] = str(reserved_cpus)
    env.pop("STEER_PLUGIN_CONFIG", None)
    if kind in ("lens_plain", "lens"):
        return lens_side.server_env(env, lens_active=kind == "lens")
    if kind == "vanilla":
        env["VLLM_PLUGINS"] = ""  # no general plugin at all: stock vLLM
    else:
        env.pop("VLLM_PLUGINS", None)
    return env


@dataclass(frozen=True)
class ServerSpec:
    """How one server starts: its kind, model and flags (the port is chosen at start)."""

    kind: str  # one of SERVER_KINDS
    model: str
    eager: bool  # --enforce-eager (vLLM's default is to compile)
    steer_config: str | None = None  # plugin: its --steer-config
    lens_venv: str | None = None  # lens_plain / lens: the side venv
    extra_args: tuple[str, ...] = ()
    served_name: str = SERVED_NAME
    reserved_cpus: int | None = None  # cores the forward's threads leave to the other processes (server_env)

    def command(self, port: int) -> list[str]:
        common = ["--model", self.model, "--served-model-name", self.served_name, "--port", str(port)]
        common += ["--host", "127.0.0.1", "--seed", "0", *self.extra_args]
        if self.eager:
            common.append("--enforce-eager")
        if self.kind == "vanilla":
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common]
        if self.kind in ("lens_plain", "lens"):
            if self.lens_venv is None:
                raise ValueError(f"a {self.kind} server needs the vllm-lens side venv")
            python = str(lens_side.side_python(self.lens_venv))
            return [python, "-m", "vllm.entrypoints.openai.api_server", *common]
        if self.steer_config is None:
            raise ValueError("a plugin server needs its --steer-config")
        launcher = [sys.executable, "-m", "steer_adapters.vllm.api.launcher"]
        return [*launcher, "--steer-config", str(self.steer_config), *common]


def free_port(used: set[int], port_range: tuple[int, int] = PORT_RANGE) -> int:
    """A port of the range that nothing listens on and this run has not handed out yet (added to `used`)."""
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


_LIVE: list[Server] = []  # started and not stopped: what stop_all() stops


class Server:
    """One server process group: started by start(), stopped (the whole group) by stop()."""

    def __init__(self, name: str, spec: ServerSpec, port: int, log_path: Path):
        self.name, self.spec, self.port, self.log_path = name, spec, port, log_path
        self.cmd = spec.command(port)
        self.env = server_env(spec.kind, reserved_cpus=spec.reserved_cpus)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def completions_url(self) -> str:
        return self.url + "/v1/completions"

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

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
        if self not in _LIVE:
            _LIVE.append(self)

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
        if self in _LIVE:
            _LIVE.remove(self)
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
                if not group_alive(pgid):
                    break
                time.sleep(0.2)
            if not group_alive(pgid):
                break
        self.proc.poll()
        self.proc = None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_all() -> None:
    """Stop every server started and not yet stopped."""
    while _LIVE:
        _LIVE[-1].stop()


def stop_on_exit() -> None:
    """Stop the servers however this process ends: normal exit, an exception, SIGTERM or SIGHUP."""

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def wait_ready(servers: list[Server], timeout_s: float, max_restarts: int = 1) -> None:
    """Until every server answers /health; one that exits during start-up is restarted (up to max_restarts)."""
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


def start_servers(
    specs: Mapping[str, ServerSpec], label: str, log_dir: Path, timeout_s: float, used_ports: set[int]
) -> dict[str, Server]:
    """Start one server per spec side by side (named `label/key`, logs `log_dir/label-key.log`) and wait until
    all are ready."""
    servers = {}
    for key, spec in specs.items():
        port = free_port(used_ports)
        servers[key] = Server(f"{label}/{key}", spec, port, log_dir / f"{label}-{key}.log")
        servers[key].start()
    print(f"[{label}] starting {', '.join(specs)} (logs in {log_dir}) ...", flush=True)
    wait_ready(list(servers.values()), timeout_s)
    return servers
