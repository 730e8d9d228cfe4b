"""What observing requests cost plain traffic, and what policy.observation buys back (README "Bounding
observation").

A plain "canary" chat is timed beside 16 streaming clients that loop over one of these loads:

  alone             no other traffic
  plain-cached      16 plain streams sharing one cached ~600-token prompt, 200 tokens each
  observing         the same 16 streams asking `inspect` top_k 64, the prompt's features and 16 traced features
                    (every prompt token computed again and encoded, 64 + 16 values streamed per token)
  plain-distinct    16 plain streams with distinct ~600-token prompts (nothing cached): what any client can
                    already cost without the plugin

on one server per `--capacity` (policy.observation.max_cost_in_flight; `none`: unbounded, the behaviour
before the bound existed), the four loads interleaved over `--rounds` rounds. Observing clients that get a 429
back off for half a second and retry, as a client should. Writes JSON and a Markdown table (benchmarks/results/observation-cost-cpu.*).

    python benchmarks/observation_cost.py                       # unbounded and the default bound (~30 min)
    python benchmarks/observation_cost.py --capacity none 16384 4096   # the committed run
    python benchmarks/observation_cost.py --capacity none 4096 --rounds 1 --canaries 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = (
    "The Golden Gate Bridge is a suspension bridge spanning the strait that connects San Francisco Bay "
    "and the Pacific Ocean. "
) * 27  # fmt: skip  ~600 tokens
LOADS = ("alone", "plain-cached", "observing", "plain-distinct")


def start_server(port: int, config: dict, log) -> subprocess.Popen:
    from steer_demo.build_assets import ensure_assets

    assets = ensure_assets()
    config = {"saes": [{"id": "demo", "path": str(assets.sae_dir)}], **config}
    folder = Path(tempfile.mkdtemp(prefix="observation-cost-"))
    (folder / "steer.json").write_text(json.dumps(config))
    cmd = [
        sys.executable, "-m", "steer_adapters.vllm.api.launcher", "--steer-config", str(folder / "steer.json"),
        "--model", str(assets.model_dir), "--served-model-name", "demo", "--dtype", "float32",
        "--enforce-eager", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=env)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up (see its log)")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise RuntimeError("the server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def body(load: str, n: int) -> dict:
    text = PROMPT if load != "plain-distinct" else f"Request number {n} at {time.time()}. {PROMPT}"
    out = {
        "model": "demo",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 200,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    if load == "observing":
        features = [{"sae": "demo", "index": i} for i in range(16)]
        out["steering"] = {"inspect": {"top_k": 64, "prompt": True, "features": features}}
    return out


class Clients:
    """16 clients looping over one load until stopped; counts requests, bytes and refusals."""

    def __init__(self, base: str, load: str, clients: int):
        self.base, self.load = base, load
        self.stop = threading.Event()
        self.done = self.bytes = self.refused = self.errors = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = i * 100_000
        while not self.stop.is_set():
            n += 1
            try:
                with requests.post(f"{self.base}/v1/chat/completions", json=body(self.load, n), stream=True,
                                   timeout=600) as r:  # fmt: skip
                    size = sum(len(chunk) for chunk in r.iter_content(65536))
                    with self.lock:
                        if r.status_code == 200:
                            self.done += 1
                            self.bytes += size
                        elif r.status_code == 429:
                            self.refused += 1
                        else:
                            self.errors += 1
                if r.status_code == 429:
                    time.sleep(0.5)
            except requests.RequestException:
                with self.lock:
                    self.errors += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)


def canary(base: str) -> float:
    start = time.monotonic()
    r = requests.post(
        f"{base}/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },  # fmt: skip
        timeout=600,
    )
    r.raise_for_status()
    return time.monotonic() - start


def measure(base: str, load: str, canaries: int, warmup_s: float, gap_s: float) -> dict:
    """One round of one load: the canary's latencies, and what the background clients got meanwhile."""
    times: list[float] = []
    if load == "alone":
        for _ in range(canaries):
            times.append(canary(base))
            time.sleep(gap_s)
        return {
            "canary_s": times,
            "background_requests": 0,
            "seconds": 0.0,
            "bytes": 0,
            "429": 0,
            "errors": 0,
        }
    with Clients(base, load, 16) as clients:
        time.sleep(warmup_s)  # every client has a request in flight
        start = time.monotonic()
        for _ in range(canaries):
            times.append(canary(base))
            time.sleep(gap_s)
        elapsed = time.monotonic() - start
    return {
        "canary_s": times,
        "background_requests": clients.done,
        "seconds": elapsed,
        "bytes": clients.bytes,
        "429": clients.refused,
        "errors": clients.errors,
    }


def summarise(load: str, rounds: list[dict]) -> dict:
    times = [t for r in rounds for t in r["canary_s"]]
    done = sum(r["background_requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    return {
        "load": load,
        "canary_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "background_per_s": round(done / seconds, 3) if seconds else None,
        "bytes_per_request": round(sum(r["bytes"] for r in rounds) / done) if done else None,
        "refused_429": sum(r["429"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
    }


def run_server(
    base: str, rounds: int, canaries: int, warmup_s: float, gap_s: float, label: str
) -> list[dict]:
    """Every load, `rounds` times over, interleaved (so a slow spell of the machine hits every load alike)."""
    for _ in range(2):  # the shared prompt in the prefix cache, the canary's path warm
        requests.post(
            f"{base}/v1/chat/completions", json={**body("plain-cached", 0), "stream": False}, timeout=600
        )
        canary(base)
    got: dict[str, list[dict]] = {load: [] for load in LOADS}
    for i in range(rounds):
        for load in LOADS:
            got[load].append(measure(base, load, canaries, warmup_s, gap_s))
            print(
                f"{label} round {i + 1} {load}: {[round(t, 2) for t in got[load][-1]['canary_s']]}",
                flush=True,
            )
    return [summarise(load, got[load]) for load in LOADS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capacity", nargs="+", default=["none", "default"],
                        help="max_cost_in_flight per server: an integer, `none` or `default`")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--canaries", type=int, default=6, help="per load and round")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--gap", type=float, default=3.0)
    parser.add_argument("--port", type=int, default=18950)
    parser.add_argument("--out", default=str(RESULTS / "observation-cost-cpu"))
    args = parser.parse_args(argv)
    from steer_plugin.config import ObservationLimits

    default = ObservationLimits().max_cost_in_flight
    runs = []
    for capacity in args.capacity:
        limit = default if capacity == "default" else None if capacity == "none" else int(capacity)
        observation = {"max_cost_in_flight": limit, "max_prompt_tokens": None}
        base = f"http://127.0.0.1:{args.port}"
        with open(Path(tempfile.gettempdir()) / f"observation-cost-server-{capacity}.log", "w") as log:
            proc = start_server(args.port, {"policy": {"observation": observation}}, log)
            try:
                rows = run_server(
                    base, args.rounds, args.canaries, args.warmup, args.gap, f"capacity {capacity}"
                )
            finally:
                stop_server(proc)
        for row in rows:
            print(f"capacity {capacity}: {json.dumps(row)}", flush=True)
        runs.append({"capacity": capacity, "max_cost_in_flight": limit, "loads": rows})
    from datetime import datetime, timezone

    from machine import cpu_model, date_and_commit_line, git_state

    commit, dirty = git_state()
    machine = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_commit": commit,
               "uncommitted_engine_files": dirty}  # fmt: skip
    report = {"date": date_and_commit_line(machine), "cpu": f"{os.cpu_count()} x {cpu_model()}", "runs": runs}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    Path(f"{args.out}.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = [
        "# Observation's cost to a plain canary (benchmarks/observation_cost.py)",
        "",
        report["date"],
        f"- CPU: {report['cpu']} (shared with other work while measured: read ratios within one run)",
        "",
        "| max_cost_in_flight | load (16 clients) | canary median s | canary runs s | background req/s "
        "| bytes / request | 429s |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for run in report["runs"]:
        for row in run["loads"]:
            lines.append(
                f"| {run['max_cost_in_flight'] or 'unbounded'} | {row['load']} | {row['median_s']:.2f} | "
                f"{', '.join(f'{t:.2f}' for t in row['canary_s'])} | {row.get('background_per_s', '')} | "
                f"{row.get('bytes_per_request', '')} | {row.get('refused_429', '')} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
