"""Which of our source files one request runs through, per process, on a real demo server.

    python -m tools.request_path [--port 8093] [--out path.json]

Starts `steer-serve-demo` (eager, loopback) with tools/path_trace/sitecustomize.py loaded into every process it
starts (API server, engine core, workers): each records the last time any function of each file under
steer_plugin/ and steer_adapters/ was entered. Then, after a warm-up, it times windows on the one clock all
processes share: an idle one (what runs with no request: the background), then one request per case, each
alone. A file counts for a case when its process entered it inside that case's window. Prints one table per case
(process role, files) and writes them as JSON. A development tool: the profiler slows every process it is in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
ROOTS = (REPO / "steer_plugin", REPO / "steer_adapters")
MODEL = "smollm2-135m-steer-demo"
QUESTION = [{"role": "user", "content": "Name a famous bridge."}]
CASES = {
    "plain": None,
    "steered": {"features": [{"sae": "demo", "index": 0, "op": "clamp", "value": 10.0}]},
    "steered+inspect": {
        "features": [{"sae": "demo", "index": 0, "op": "clamp", "value": 10.0}],
        "inspect": {"top_k": 3},
    },
}


def role_of(cmdline: str) -> str:
    """The process a command line belongs to: vLLM renames its engine core and workers (VLLM::EngineCore)."""
    if cmdline.startswith("VLLM::"):
        return cmdline.split()[0].removeprefix("VLLM::")
    if "api_server" in cmdline or "steer_demo.serve" in cmdline:
        return "APIServer"
    return cmdline[:40]


def snapshot(trace_dir: str) -> dict[int, dict]:
    tables = {}
    for name in os.listdir(trace_dir):
        if name.endswith(".json"):
            try:
                with open(os.path.join(trace_dir, name)) as f:
                    table = json.load(f)
            except (OSError, ValueError):
                continue
            tables[table["pid"]] = table
    return tables


def touched(trace_dir: str, start: float) -> dict[str, dict[str, list[str]]]:
    """{role: {our file: its functions entered since `start`}}, read once every process has written its table
    again (a function entered again after the window still counts: what also runs with no request shows in the
    idle window)."""
    time.sleep(1.5)
    out: dict[str, dict[str, set[str]]] = {}
    for table in snapshot(trace_dir).values():
        for where, t in table["last"].items():
            if t >= start:
                path, function = where.rsplit(":", 1)
                role = out.setdefault(role_of(table["cmdline"]), {})
                role.setdefault(os.path.relpath(path, REPO), set()).add(function)
    return {role: {f: sorted(fns) for f, fns in sorted(files.items())} for role, files in sorted(out.items())}


def chat(base: str, steering: dict | None) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0.0}
    if steering is not None:
        body["steering"] = steering
    reply = requests.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()


def show(result: dict[str, dict[str, dict[str, list[str]]]]) -> None:
    for case, by_role in result.items():
        files = sorted({file for functions in by_role.values() for file in functions})
        print(f"\n== {case}: {len(files)} files ==")
        for role, by_file in by_role.items():
            print(f"  {role} ({len(by_file)}):")
            for file, functions in by_file.items():
                print(f"    {file}: {' '.join(functions)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument(
        "--out", default=None, help="write the tables (with each file's functions) as JSON here"
    )
    parser.add_argument("--log", default="request-path-server.log")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    trace_dir = tempfile.mkdtemp(prefix="request-path-")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "tools" / "path_trace"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
        "STEER_PATH_TRACE_DIR": trace_dir,
        "STEER_PATH_TRACE_ROOTS": os.pathsep.join(str(r) + os.sep for r in ROOTS),
    }
    cmd = [sys.executable, "-m", "steer_demo.serve", "--port", str(args.port), "--host", "127.0.0.1"]
    cmd += ["--max-model-len", "1024", "--enforce-eager"]
    with open(args.log, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.time()
        while True:
            if server.poll() is not None:
                sys.exit(f"request_path: the server exited ({server.returncode}); see {args.log}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() - started > 1200:
                sys.exit("request_path: server not ready after 20 min")
            time.sleep(2)
        print(f"request_path: server ready after {time.time() - started:.0f}s", flush=True)
        for steering in CASES.values():  # warm-up: lazy imports and first-use work stay out of the windows
            chat(base, steering)
        time.sleep(3)
        start = time.monotonic()
        time.sleep(3)
        result = {"idle": touched(trace_dir, start)}
        for case, steering in CASES.items():
            time.sleep(2)
            start = time.monotonic()
            chat(base, steering)
            result[case] = touched(trace_dir, start)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        show(result)
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)


if __name__ == "__main__":
    main()
