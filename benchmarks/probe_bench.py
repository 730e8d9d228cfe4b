#!/usr/bin/env python
"""What scoring probes on every token costs, against one decoder layer of the same width (issue target: 16 probes on
every token <= 0.2% of a decoder layer at every T).

    python benchmarks/probe_bench.py                      # CPU, d_model 4096, bf16, 16 probes, T = 1..2048
    python benchmarks/probe_bench.py --dtype float32      # a CPU without bf16 arithmetic (AVX2 only): the dtype
                                                          # it serves in (a bf16 layer there is emulated, ~10x slower)
    python benchmarks/probe_bench.py --smoke --out /tmp/probe-smoke

Per T (token rows of one step, every one observed):
  - capture: what the op adds for observed rows at a probe's layer, the copy of their steered residual into the
             persistent capture buffer (engine/op.py's in-place copy of rows 0..T-1, every token observed);
  - score:   ProbeReader.collect for the layer: one [T, d] x [d, 16] product for its 16 probes, the sigmoid, and
             one ProbeBlock for all of the step's requests (T decoding requests of one row);
  - step:    what the worker's host does once a step for every observed layer together (so not counted against
             one layer; reported against a step of LAYERS layers): plan the step's reads (engine/captures.py:
             each observed request's rows, its probes by layer) and the transport's flush (the step's records
             encoded, authenticated and queued as one message to a socket this process reads, drained between
             timings); timed with the layer's collect in between, whose time is taken off;
  - layer:   op_bench's plain-torch Llama-like decoder layer (same width, dtype, T).
Writes OUT.json and OUT.md (default benchmarks/results/probe-cpu).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from machine import date_and_commit_line
from op_bench import LlamaLikeLayer, machine_info, time_fn

REPO = Path(__file__).resolve().parents[1]
TARGET_PERCENT = 0.2
LAYERS = 32  # decoder layers of a d_model 4096 model (Llama 3 8B): what the once-a-step work is spread over


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--tokens", help="comma list (default 1,16,128,512,2048)")
    p.add_argument("--min-time", type=float)
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the layer's and residual's"
    )
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "probe-cpu"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import numpy as np

    from steer_plugin.engine.captures import plan_reads
    from steer_plugin.engine.op import capture_sum
    from steer_plugin.engine.probing import ProbeReader
    from steer_plugin.monitor import inbox as observe_inbox
    from steer_plugin.monitor import transport
    from steer_plugin.probes.format import Probe, ProbeMeta
    from steer_plugin.request.wire import ObservePlan

    smoke = args.smoke
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    short = {"bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    d, inter, heads, kv_heads, context = (256, 512, 4, 2, 16) if smoke else (4096, 14336, 32, 8, 256)
    tokens = [int(t) for t in (args.tokens or ("1,8" if smoke else "1,16,128,512,2048")).split(",")]
    min_time = args.min_time or (0.02 if smoke else 0.3)
    torch.manual_seed(0)
    probes = {
        f"p{i}": Probe(ProbeMeta(0, ("on",)), torch.randn(1, d) / d**0.5, torch.zeros(1))
        for i in range(args.probes)
    }
    reader = ProbeReader(probes, device, write=True)
    ids = tuple(probes)
    inbox = observe_inbox.inbox()  # the records go here (nobody opened a mailbox: each message is dropped)
    layer = LlamaLikeLayer(d, inter, heads, kv_heads, context, dtype, device).eval()
    capture = torch.zeros(max(tokens), d, dtype=torch.float32)
    rows_out = []
    print(f"probe_bench: d_model {d}, {args.probes} probes, {short}, CPU; T = {tokens}", flush=True)
    for t in tokens:
        hidden, out = torch.randn(t, d, dtype=dtype), torch.randn(t, d, dtype=dtype)
        # decode steps have one row per request: T requests of one row each, at position 10 + i
        req_ids = [f"req-{i}" for i in range(t)]
        plans = {r: ObservePlan(f"{i:032x}", (), 1, False, probes=ids, reply_to=inbox.address)
                 for i, r in enumerate(req_ids)}  # fmt: skip
        layout = (req_ids, ["plan"] * t, np.arange(t + 1), np.arange(10, 10 + t), np.full(t, 10))

        def planned(layout=layout, plans=plans):
            return plan_reads(layout, lambda req_id, _wire, plans=plans: plans[req_id], reader.layer_of)

        queued = []  # messages each step's flush queued: the records did go out

        def whole_step(planned=planned, queued=queued):  # plan, score (the layer's collect), send
            reader.collect(planned().probed, {0: capture})
            queued.append(transport.flush())

        groups = planned().probed

        def copy(t=t, hidden=hidden, out=out):  # engine/op.py's copy of rows 0..T-1 (every token observed)
            capture_sum(capture, hidden, out, t)

        with torch.inference_mode():
            cap = time_fn(copy, device, min_time)
            score = time_fn(lambda g=groups: reader.collect(g, {0: capture}), device, min_time)
            transport.flush()
            whole = time_fn(whole_step, device, min_time)
            step = {"median_us": max(0.0, whole["median_us"] - score["median_us"])}
            inbox.drain()
            lay = time_fn(lambda x=hidden: layer(x), device, min_time)
        share = 100 * (cap["median_us"] + score["median_us"]) / lay["median_us"]
        row = {
            "tokens": t,
            "capture_us": cap["median_us"],
            "score_us": score["median_us"],
            "layer_us": lay["median_us"],
            "percent_of_layer": share,
            "step_us": step["median_us"],
            "messages_queued": sum(queued),
            "percent_of_step": 100 * step["median_us"] / (LAYERS * lay["median_us"]),
        }
        rows_out.append(row)
        print(
            f"  T={t:5d}: capture {cap['median_us']:9.1f} us  score {score['median_us']:9.1f} us  "
            f"layer {lay['median_us']:10.1f} us  -> {share:.3f}% of the layer; once a step "
            f"{step['median_us']:9.1f} us ({row['percent_of_step']:.3f}% of {LAYERS} layers)",
            flush=True,
        )
    result = {
        "settings": {"d_model": d, "probes": args.probes, "dtype": args.dtype, "intermediate": inter,
                     "heads": heads, "kv_heads": kv_heads, "context": context, "smoke": smoke},
        "machine": machine_info(device),

        "rows": rows_out,
        "layers_per_step": LAYERS,
        "target_percent": TARGET_PERCENT,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Probes on every token: {args.probes} probes, d_model {d}, {short}, CPU",
        "",
        date_and_commit_line(result["machine"]),
        "",
        f"Target: capture + score <= {TARGET_PERCENT}% of one decoder layer at every T (issue 24). Once a step "
        f"(whatever the layers observed): plan the reads and send the records, against {LAYERS} such layers.",
        "",
        "| T | capture µs | score µs | layer µs | % of layer | target | once a step µs | % of step |",
        "|---:|---:|---:|---:|---:|:---|---:|---:|",
    ]
    for r in rows_out:
        ok = "met" if r["percent_of_layer"] <= TARGET_PERCENT else "missed"
        lines.append(
            f"| {r['tokens']} | {r['capture_us']:.1f} | {r['score_us']:.1f} | {r['layer_us']:.0f} | "
            f"{r['percent_of_layer']:.3f} | {ok} | {r['step_us']:.1f} | {r['percent_of_step']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"probe_bench: wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
