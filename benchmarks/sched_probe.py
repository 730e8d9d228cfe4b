#!/usr/bin/env python
"""Where the CPU goes while vLLM decodes: per-thread run time, run-queue wait and context switches of every
process of an offline `LLM` (this process, the engine core, the worker), read from /proc around one generate().

Built to explain the compile-mode anomaly of issue 9 (a compiled plugin server with nothing steered ran faster
than compiled plain vLLM on the 2-core CPU machine; benchmarks/results/cpu-smollm2-notes.md).

    .venv/bin/python benchmarks/sched_probe.py --server vanilla
    .venv/bin/python benchmarks/sched_probe.py --server op          # the plugin's op at the demo layer, idle
    .venv/bin/python benchmarks/sched_probe.py --server vanilla --env OMP_WAIT_POLICY=PASSIVE

`--server vanilla`: stock vLLM (VLLM_PLUGINS=""). `--server op`: the plugin with the demo steering config
(its op is in the compiled graph at the SAE's layer) and no request steered. Both run with the environment of
serve_bench's servers of the same kind (harness.servers.server_env), set before vLLM is imported. Each run: one warm-up generate,
then for each concurrency a timed generate of `--tokens` tokens per prompt (ignore_eos, greedy), with the
per-thread counters read before and after. Prints one JSON line per concurrency (tok/s and, per process role
and thread, CPU seconds, run-queue wait seconds, voluntary and involuntary switches during the timed generate),
and a table to stderr. `--steer` (op only) times each concurrency twice in the same start, unsteered then with
serve_bench's case (c) on every request. `--perf` / `--pyspy` add a perf or py-spy recording of each timed generate.
The findings and the start-to-start comparison (six fresh starts of each server, alternating) are in
benchmarks/results/compile-anomaly-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.servers import server_env
from serve_cases import PROMPTS, add_steering

REPO = Path(__file__).resolve().parents[1]
PROMPT = PROMPTS[0]
# --steer: serve_bench's case (c), one `add` of feature 7 at value 4 of the demo SAE on every request
STEERING = add_steering("demo")


@dataclass
class ThreadCounters:
    """One thread's cumulative scheduler counters (/proc/PID/task/TID/{schedstat,status,comm})."""

    role: str  # the process: client | engine_core | worker | other
    comm: str  # the thread's name
    run_s: float  # time on a CPU
    wait_s: float  # time runnable but waiting for a CPU
    voluntary: int  # switches because the thread blocked or yielded
    involuntary: int  # switches because the scheduler took the CPU away


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _role(pid: int) -> str:
    if pid == os.getpid():
        return "client"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "other"
    name = f"{comm} {cmd}"
    if "EngineCore" in name:
        return "engine_core"
    if "Worker" in name or "VllmWorker" in name:
        return "worker"
    return "other"


def snapshot() -> dict[tuple[int, int], ThreadCounters]:
    """Counters of every thread of this process tree, keyed by (pid, tid)."""
    snap = {}
    for pid in _tree(os.getpid()):
        role = _role(pid)
        try:
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            base = Path(f"/proc/{pid}/task/{tid}")
            try:
                run_ns, wait_ns, _ = (int(x) for x in (base / "schedstat").read_text().split())
                status = (base / "status").read_text()
                comm = (base / "comm").read_text().strip()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            snap[(pid, tid)] = ThreadCounters(
                role,
                comm,
                run_ns / 1e9,
                wait_ns / 1e9,
                int(fields["voluntary_ctxt_switches"]),
                int(fields["nonvoluntary_ctxt_switches"]),
            )
    return snap


def delta(
    before: dict[tuple[int, int], ThreadCounters], after: dict[tuple[int, int], ThreadCounters]
) -> list[ThreadCounters]:
    """Per-thread differences, threads that did nothing left out, busiest first."""
    out = []
    for key, a in after.items():
        b = before.get(key)
        d = ThreadCounters(
            a.role,
            f"{a.comm}[{key[1]}]",
            a.run_s - (b.run_s if b else 0),
            a.wait_s - (b.wait_s if b else 0),
            a.voluntary - (b.voluntary if b else 0),
            a.involuntary - (b.involuntary if b else 0),
        )
        if d.run_s > 1e-3 or d.wait_s > 1e-3:
            out.append(d)
    return sorted(out, key=lambda d: (d.role, -d.run_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", choices=["vanilla", "op"], required=True)
    ap.add_argument("--mode", choices=["compile", "eager"], default="compile")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--perf", help="write a system-wide `perf record` of each timed generate to PERF.cN.data")
    ap.add_argument(
        "--perf-kind",
        choices=["samples", "sched"],
        default="samples",
        help="samples: sampled CPU profile (perf record -a); sched: every context switch and wake-up (`perf sched timehist`)",
    )
    ap.add_argument(
        "--pyspy",
        help="record Python stacks (py-spy, --idle, raw) of the worker and engine core to PYSPY.cN.*.txt",
    )
    ap.add_argument(
        "--steer",
        action="store_true",
        help="--server op: time each concurrency twice in the same start, unsteered then steered (STEERING)",
    )
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE set before vLLM is imported")
    ap.add_argument("--model", default=str(REPO / "assets" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--config", default=str(REPO / "assets" / "sae" / "demo-steer-config.json"))
    args = ap.parse_args()
    if args.steer and args.server != "op":
        ap.error("--steer needs --server op")

    env = server_env("vanilla" if args.server == "vanilla" else "plugin")
    if args.server == "op":  # in process: the plugin reads its config from the environment
        env["STEER_PLUGIN_CONFIG"] = args.config
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    os.environ.clear()
    os.environ.update(env)

    from vllm import LLM, SamplingParams

    llm = LLM(
        args.model,
        seed=0,
        enforce_eager=args.mode == "eager",
        max_model_len=1024,
        enable_prefix_caching=False,
    )
    # logprobs=0: the sampled token's log-prob, so a steered run shows that its steering reached the model
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    llm.generate([PROMPT] * 2, params, use_tqdm=False)  # warm-up
    variants = [("unsteered", params)]
    if args.steer:
        from steer_plugin.config import load_config_file
        from steer_plugin.offline import steering_args

        extra = steering_args(load_config_file(args.config), STEERING)
        steered = SamplingParams(
            max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=0, extra_args=extra
        )
        variants.append(("steered", steered))
    for conc in (int(c) for c in args.concurrency.split(",")):
        for name, sampling in variants:
            row = timed_generate(llm, [PROMPT] * conc, sampling, args, f"c{conc}.{name}")
            row.update(server=args.server, mode=args.mode, env=args.env, concurrency=conc, requests=name)
            print(json.dumps(row), flush=True)
            print(
                f"\n{args.server} {args.mode} {' '.join(args.env)} c={conc} {name}: {row['tok_s']:.1f} tok/s, "
                f"wall {row['wall_s']:.2f} s",
                file=sys.stderr,
            )
            print(
                f"{'role':12} {'thread':28} {'run s':>8} {'wait s':>8} {'vol':>8} {'invol':>8}",
                file=sys.stderr,
            )
            for t in row["threads"]:
                print(
                    f"{t['role']:12} {t['comm']:28} {t['run_s']:8.3f} {t['wait_s']:8.3f} {t['voluntary']:8d} "
                    f"{t['involuntary']:8d}",
                    file=sys.stderr,
                )


def timed_generate(llm, prompts: list[str], params, args, tag: str) -> dict:
    """One timed generate with the per-thread counters around it (and perf / py-spy if asked)."""
    perf = None
    if args.perf:
        out = f"{args.perf}.{tag}.data"
        cmd = (
            ["perf", "sched", "record", "-o", out] if args.perf_kind == "sched" else ["perf", "record", "-a"]
        )
        if args.perf_kind != "sched":
            cmd += ["-F", "1999", "-o", out]
        perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # perf attaches to every CPU before the clock starts
    spies = []
    if args.pyspy:
        for pid in _tree(os.getpid()):
            role = _role(pid)
            if role in ("worker", "engine_core") and not any(r == role for r, _ in spies):
                cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--idle"]
                cmd += ["--nonblocking", "--rate", "250", "--format", "raw"]
                cmd += ["--output", f"{args.pyspy}.{tag}.{role}.txt"]
                spies.append(
                    (role, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                )
        time.sleep(1.0)
    before = snapshot()
    wall0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - wall0
    after = snapshot()
    for _, spy in spies:
        spy.send_signal(signal.SIGINT)
        spy.wait()
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    first = outs[0].outputs[0]
    return {
        "tokens": tokens,
        "first_logprob_sum": round(sum(lp[t].logprob for lp, t in zip(first.logprobs, first.token_ids)), 4),
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2),
        "threads": [asdict(t) for t in delta(before, after)],
    }


if __name__ == "__main__":
    main()
