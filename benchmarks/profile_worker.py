#!/usr/bin/env python
"""Where a steered server spends its time: py-spy on the vLLM processes under serve_bench cases' load.

    python benchmarks/profile_worker.py                                   # compile mode, c=16, cases b c e f g h
    python benchmarks/profile_worker.py --cases c_add1,h_inspect --mode eager --out /tmp/prof

For each server kind the cases need (same flags and configs as serve_bench.py) it starts one server, warms it
up, and per case keeps the case's requests flowing at the given concurrency while `py-spy record --format raw`
(pip install py-spy) samples the API server, the engine core and the worker at once. Writes OUT.md / OUT.json
(share of each process's active samples inside steer_plugin / steer_adapters code, top functions, the CPU
each process used) and the collapsed stacks in OUT-raw/. Shares of samples are robust to a noisy machine in a
way that end-to-end throughput is not.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench  # noqa: E402
from harness.cpu import cpu_seconds  # noqa: E402
from harness.load import run_requests  # noqa: E402
from harness.servers import start_servers, stop_all  # noqa: E402
from machine import machine_info  # noqa: E402
from serve_cases import CASE_BY_KEY, resolve_assets, write_configs  # noqa: E402
from serve_run import Bench  # noqa: E402

OURS = ("steer_plugin/", "steer_adapters/")


def worker_pid(pgid: int, timeout_s: float = 30, prefix: str = "VLLM::Worker") -> int:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != pgid:
                    continue
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ProcessLookupError):
                continue
            if cmd.startswith(prefix):
                return int(pid)
        time.sleep(0.5)
    raise RuntimeError(f"no {prefix} process found in the server's process group")


def frame_key(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)' relative to the repo/package."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("steer_plugin/", "steer_adapters/", "vllm/", "torch/"):
        if marker in path:
            path = marker + path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


LANDMARKS = ("GPUModelRunner.execute_model (", "GPUModelRunner._model_forward (", "LlamaModel.forward (")
WRAPPER = "_wrap_model_forward.<locals>.model_forward ("  # wraps the whole forward: not steering's own time


def analyse(raw: str) -> tuple[int, int, Counter, Counter]:
    """(active samples, samples inside steering's own code, inclusive samples per our function, per landmark)."""
    total = plugin = 0
    ours: Counter = Counter()
    landmarks: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        seen, marks = set(), set()
        for f in stack.split(";"):
            key = frame_key(f)
            if any(m in f for m in OURS):
                seen.add(key)
            if key.startswith(LANDMARKS):
                marks.add(key)
        if any(not k.startswith(WRAPPER) for k in seen):
            plugin += n
        for k in seen:
            ours[k] += n
        for k in marks:
            landmarks[k] += n
    return total, plugin, ours, landmarks


PROCESS_ROLES = (("worker", "VLLM::Worker"), ("engine", "VLLM::EngineCore"))


def server_processes(pgid: int) -> dict[str, int]:
    """{role: pid} for the API server (the group leader), its engine core and its worker."""
    found = {"api": pgid}
    for role, prefix in PROCESS_ROLES:
        try:
            found[role] = worker_pid(pgid, prefix=prefix)
        except RuntimeError:
            pass
    return found


def profile_case(
    bench, server, case: str, mode: str, conc: int, seconds: float, rate: int, out_dir: Path
) -> dict:
    procs = server_processes(server.pgid)
    stop = threading.Event()

    def load():
        rnd = 0
        while not stop.is_set():
            bodies = bench.bodies(case, conc * 2, mode, 1000 + rnd, conc)
            run_requests(server.completions_url, bodies, conc, 600)
            rnd += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(3)  # reach a steady batch
    print(f"  py-spy on {case} ({mode}, c={conc}) for {seconds:.0f}s: {procs}", flush=True)
    raws = {role: out_dir / f"{case}-{mode}-c{conc}-{role}.txt" for role in procs}
    cpu0 = {role: cpu_seconds(pid) for role, pid in procs.items()}
    t0 = time.perf_counter()
    spies = {
        role: subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(raws[role]),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for role, pid in procs.items()
    }
    for spy in spies.values():
        spy.wait(timeout=seconds + 60)
    elapsed = time.perf_counter() - t0
    cpu = {role: (cpu_seconds(pid) - cpu0[role]) / elapsed for role, pid in procs.items()}
    stop.set()
    thread.join(timeout=300)
    result = {"case": case, "mode": mode, "concurrency": conc, "cpu_cores": cpu, "processes": {}}
    for role, path in raws.items():
        if not path.exists():
            continue
        total, plugin, ours, landmarks = analyse(path.read_text())
        result["processes"][role] = {
            "samples": total,
            "steering_share": plugin / max(total, 1),
            "top": [(k, n / max(total, 1)) for k, n in ours.most_common(12)],
            "landmarks": [(k, n / max(total, 1)) for k, n in landmarks.most_common()],
        }
    return result


def write_report(path: Path, results: list[dict], args) -> None:
    m = machine_info()
    dirty = m.get("uncommitted_engine_files") or []
    lines = [
        "# Where a steered server spends its time (py-spy)",
        "",
        f"- {m['date_utc']}; git {m['git_commit']}"
        + (f" with {len(dirty)} uncommitted engine/adapter files" if dirty else "")
        + f"; {m['cpu_model']}, {m['usable_cpus']} CPUs; vLLM {m['vllm']}, torch {m['torch']}",
        "",
        f"py-spy record at {args.rate} Hz for {args.seconds:.0f}s per case, on the API server, the engine core and the "
        "worker of one server, while the case's requests flow at the given concurrency (max_tokens "
        f"{args.max_tokens}). `steering` = share of that process's active samples inside steer_plugin / "
        "steer_adapters code, excluding the wrapper around the whole forward. `cores` = CPU used by the process "
        "during the window.",
        "",
        "| case | mode | conc | worker steering | worker cores | engine core steering | engine cores | API server steering | API cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = []
        for role in ("worker", "engine", "api"):
            pr = r["processes"].get(role)
            cells.append("–" if pr is None else f"{100 * pr['steering_share']:.2f}%")
            cells.append(f"{r['cpu_cores'].get(role, 0):.2f}")
        lines.append(f"| {r['case']} | {r['mode']} | {r['concurrency']} | " + " | ".join(cells) + " |")
    for r in results:
        for role in ("worker", "api", "engine"):
            pr = r["processes"].get(role)
            if not pr or not pr["top"]:
                continue
            lines += [
                "",
                f"### {r['case']} ({r['mode']}, c={r['concurrency']}): {role}, inclusive shares",
                "",
            ]
            lines += ["| function | share |", "|---|---:|"]
            for key, share in [*pr["landmarks"], *pr["top"]]:
                lines.append(f"| {key} | {100 * share:.2f}% |")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases",
        default="b_loaded,c_add1,e_distinct256,f_clamp8,g_4layers,h_inspect",
        help="comma list of serve_bench case keys; servers are shared between cases of the same server kind",
    )
    p.add_argument("--mode", default="compile", choices=["eager", "compile"])
    p.add_argument("--concurrency", default="1,16", help="comma list")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="output path without extension (default: a temp folder)")
    p.add_argument("--model")
    p.add_argument("--sae")
    args = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("profile_worker: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    cases = args.cases.split(",")
    concs = [int(c) for c in args.concurrency.split(",")]
    for c in cases:
        if c not in CASE_BY_KEY:
            raise SystemExit(f"unknown case {c!r}")
    workdir = Path(tempfile.mkdtemp(prefix="profile_worker-"))
    out = Path(args.out) if args.out else workdir / f"profile-{args.mode}"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_dir = out.parent / f"{out.name}-raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    model_dir, sae_dir, labels = resolve_assets(args.model, args.sae)
    setup, configs = write_configs(workdir, model_dir, sae_dir, labels, 0)
    opts = serve_bench.build_options(
        serve_bench.parse_args(["--modes", args.mode, "--concurrency", args.concurrency, "--requests",
                       ",".join(str(2 * c) for c in concs), "--cases", ",".join(cases), "--max-tokens", str(args.max_tokens)])
    )  # fmt: skip
    bench = Bench(opts, setup, model_dir, configs, workdir)
    atexit.register(stop_all)
    results = []
    try:
        for kind in ("vanilla", "plugin", "plugin4"):
            mine = [c for c in cases if CASE_BY_KEY[c].server == kind]
            if not mine:
                continue
            spec = {kind: bench.server_spec(kind, args.mode)}
            timeout = opts.start_timeout[args.mode]
            server = start_servers(spec, args.mode, workdir / "logs", timeout, bench.used_ports)[kind]
            bench.warm_up(args.mode, {kind: server})
            for case in mine:
                for conc in concs:
                    results.append(
                        profile_case(bench, server, case, args.mode, conc, args.seconds, args.rate, raw_dir)
                    )
            server.stop()
    finally:
        stop_all()
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_report(out.with_suffix(".md"), results, args)
    print(out.with_suffix(".md").read_text())
    print(
        f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')} and raw stacks in {raw_dir}", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
