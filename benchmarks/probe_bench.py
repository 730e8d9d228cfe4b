#!/usr/bin/env python
"""What scoring probes on every token costs, against one decoder layer of the same width (issue target: 16 probes on
every token <= 0.2% of a decoder layer at every T).

    python benchmarks/probe_bench.py                      # CPU, d_model 4096, bf16, 16 probes, T = 1..2048
    python benchmarks/probe_bench.py --smoke --out /tmp/probe-smoke

Per T (token rows of one step, every one observed):
  - capture: what the op adds for observed rows at a probe's layer, the copy of their steered residual into the
             persistent capture buffer (engine/op.py's in-place copy of rows 0..T-1, every token observed);
  - score:   steer_plugin.engine.probing.ProbeReader.collect for the step: one [T, d] x [d, 16] product for the
             layer's 16 probes, the sigmoid, and the records (one per request: T decoding requests of one row)
             (sending off: the transport's cost per token is benchmarks/observe_transport_bench.py's);
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--tokens", help="comma list (default 1,16,128,512,2048)")
    p.add_argument("--min-time", type=float)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "probe-cpu"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from steer_plugin.engine.op import capture_sum
    from steer_plugin.engine.probing import ProbedRows, ProbeReader
    from steer_plugin.probes.format import Probe, ProbeMeta

    smoke = args.smoke
    device, dtype = torch.device("cpu"), torch.bfloat16
    d, inter, heads, kv_heads, context = (256, 512, 4, 2, 16) if smoke else (4096, 14336, 32, 8, 256)
    tokens = [int(t) for t in (args.tokens or ("1,8" if smoke else "1,16,128,512,2048")).split(",")]
    min_time = args.min_time or (0.02 if smoke else 0.3)
    torch.manual_seed(0)
    probes = {
        f"p{i}": Probe(ProbeMeta(0, ("on",)), torch.randn(1, d) / d**0.5, torch.zeros(1))
        for i in range(args.probes)
    }
    reader = ProbeReader(probes, device, write=False)
    ids = tuple(probes)
    layer = LlamaLikeLayer(d, inter, heads, kv_heads, context, dtype, device).eval()
    capture = torch.zeros(max(tokens), d, dtype=torch.float32)
    rows_out = []
    print(f"probe_bench: d_model {d}, {args.probes} probes, bf16, CPU; T = {tokens}", flush=True)
    for t in tokens:
        hidden, out = torch.randn(t, d, dtype=dtype), torch.randn(t, d, dtype=dtype)
        # one group per request: decode steps have one row per request, so T requests of one row each
        groups = [ProbedRows(f"{i:032x}", 0, ids, [i], [10 + i], 10) for i in range(t)]

        def copy(t=t, hidden=hidden, out=out):  # engine/op.py's copy of rows 0..T-1 (every token observed)
            capture_sum(capture, hidden, out, t)

        with torch.inference_mode():
            cap = time_fn(copy, device, min_time)
            score = time_fn(lambda g=groups: reader.collect(g, {0: capture}), device, min_time)
            lay = time_fn(lambda x=hidden: layer(x), device, min_time)
        share = 100 * (cap["median_us"] + score["median_us"]) / lay["median_us"]
        row = {
            "tokens": t,
            "capture_us": cap["median_us"],
            "score_us": score["median_us"],
            "layer_us": lay["median_us"],
            "percent_of_layer": share,
        }
        rows_out.append(row)
        print(
            f"  T={t:5d}: capture {cap['median_us']:9.1f} us  score {score['median_us']:9.1f} us  "
            f"layer {lay['median_us']:10.1f} us  -> {share:.3f}% of the layer",
            flush=True,
        )
    result = {
        "settings": {"d_model": d, "probes": args.probes, "dtype": "bfloat16", "intermediate": inter,
                     "heads": heads, "kv_heads": kv_heads, "context": context, "smoke": smoke},
        "machine": machine_info(device),

        "rows": rows_out,
        "target_percent": TARGET_PERCENT,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Probes on every token: {args.probes} probes, d_model {d}, bf16, CPU",
        "",
        date_and_commit_line(result["machine"]),
        "",
        f"Target: capture + score <= {TARGET_PERCENT}% of one decoder layer at every T (issue 24).",
        "",
        "| T | capture µs | score µs | layer µs | % of layer | target |",
        "|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows_out:
        ok = "met" if r["percent_of_layer"] <= TARGET_PERCENT else "missed"
        lines.append(
            f"| {r['tokens']} | {r['capture_us']:.1f} | {r['score_us']:.1f} | {r['layer_us']:.0f} | "
            f"{r['percent_of_layer']:.3f} | {ok} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"probe_bench: wrote {out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
