#!/usr/bin/env python
"""Op-level microbenchmark of the steering op at real sizes, without vLLM.

    python benchmarks/op_bench.py                               # CPU, d_model 4096, 65536 features, bf16
    python benchmarks/op_bench.py --smoke --out /tmp/op-smoke   # tiny sizes, seconds
    python benchmarks/op_bench.py --device cuda --cuda-graph --out benchmarks/results/op-cuda   # on a GPU
    python benchmarks/op_bench.py --fixed-shape     # the fixed-shape (CUDA-graph) op beside the eager op, by live rows

One layer's bank is built with steer_plugin.engine.bank.build_layer_bank from a random SparseAutoencoder
(d_model x d_sae), its slot tables and working set with steer_plugin.engine.tables.LayerTables, the per-step
metadata with engine.step.StepMetadata through engine.slots.SlotPlanner (what Steerer.prepare runs), and the
op is called as vLLM calls it: torch.ops.steer_plugin.steer_residual(hidden, residual, layer). A batch of T
token rows is split into min(T, C) requests with C distinct configs; each config is `add` of one feature or
`clamp` of K features (distinct feature indices per config). Timed separately:
  - prepare: the SlotPlanner steps of Steerer.prepare (prepare_step below) for the step, steady (the
           same requests again: decode) and all new (every request new: each takes a slot and writes its plan
           at this layer);
  - op:    the custom op on those tables (eager; with --cuda-graph: replay of a graph captured once per T with
           nothing steered, with every replayed result checked per token against the eager op);
  - none:  the op when no row is steered (plugin loaded, request unsteered);
  - layer: one plain-torch Llama-like decoder layer of the same width (RMSNorm, q/k/v/o with GQA, SDPA over a
           short cached context plus the T new tokens, RMSNorm, SwiGLU MLP), same dtype and token count;
  - encode: a full SAE encode + top-k of the same T tokens (the cost an `inspect` of that SAE would add).
Writes OUT.json and OUT.md. --fixed-shape is its own mode (benchmarks/op_fixed_shape.py): the op forced into
the form a CUDA graph captures, timed beside the eager op for 0, 1 and more live rows at the server's sizes;
it writes benchmarks/results/op-fixed-shape-cpu.{json,md} unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model, date_and_commit_line, git_state

REPO = Path(__file__).resolve().parents[1]
LAYER = 0


# --- timing ---------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn, device: torch.device, min_time: float, min_reps: int = 3, max_reps: int = 200, warmup: int = 1
) -> dict:
    """Wall time per call in microseconds (median, min, reps); CUDA work is synchronised around every call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    total = 0.0
    while len(times) < min_reps or (total < min_time and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        dt_ = time.perf_counter() - t
        times.append(dt_)
        total += dt_
    return {"median_us": statistics.median(times) * 1e6, "min_us": min(times) * 1e6, "reps": len(times)}


def time_cuda_events(fn, min_time: float, min_reps: int = 10, max_reps: int = 2000) -> dict:
    """GPU time per call (CUDA events around a batch of calls), in microseconds."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    batch = 1
    while True:  # grow the batch until it takes ~min_time/5
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms > min_time * 1000 / 5 or batch >= max_reps:
            break
        batch *= 2
    per = []
    for _ in range(max(min_reps // 2, 5)):
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) * 1000 / batch)
    return {"median_us": statistics.median(per), "min_us": min(per), "reps": batch * len(per)}


# --- the model side: one decoder layer and an SAE encode -------------------------------------------------------------


def random_topk_sae(d: int, d_sae: int, dtype: torch.dtype):
    """A TopK SAE (k = 64) with random weights at the benchmark's sizes (the current torch seed)."""
    from steer_plugin.sae.model import SparseAutoencoder

    return SparseAutoencoder(
        W_enc=torch.randn(d, d_sae, dtype=dtype) / d**0.5,
        W_dec=torch.randn(d_sae, d, dtype=dtype) / d**0.5,
        b_enc=torch.zeros(d_sae, dtype=dtype),
        b_dec=torch.zeros(d, dtype=dtype),
        architecture="topk",
        k=64,
    )


class LlamaLikeLayer(torch.nn.Module):
    """RMSNorm -> q/k/v (GQA) -> SDPA over `context` cached tokens + the new ones -> o -> RMSNorm -> SwiGLU MLP."""

    def __init__(self, d: int, inter: int, heads: int, kv_heads: int, context: int, dtype, device):
        super().__init__()
        self.d, self.heads, self.kv_heads, self.hd = d, heads, kv_heads, d // heads
        mk = lambda o, i: torch.nn.Linear(i, o, bias=False, dtype=dtype, device=device)  # noqa: E731
        self.q, self.k, self.v, self.o = (
            mk(d, d),
            mk(kv_heads * self.hd, d),
            mk(kv_heads * self.hd, d),
            mk(d, d),
        )
        self.gate, self.up, self.down = mk(inter, d), mk(inter, d), mk(d, inter)
        self.n1 = torch.ones(d, dtype=dtype, device=device)
        self.n2 = torch.ones(d, dtype=dtype, device=device)
        self.k_cache = torch.randn(1, heads, context, self.hd, dtype=dtype, device=device)
        self.v_cache = torch.randn(1, heads, context, self.hd, dtype=dtype, device=device)

    @staticmethod
    def _rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    def forward(self, x):  # x [T, d]
        t = x.shape[0]
        h = self._rms(x, self.n1)
        q = self.q(h).view(t, self.heads, self.hd).transpose(0, 1)[None]  # [1, H, T, hd]
        rep = self.heads // self.kv_heads
        k = self.k(h).view(t, self.kv_heads, self.hd).repeat_interleave(rep, dim=1).transpose(0, 1)[None]
        v = self.v(h).view(t, self.kv_heads, self.hd).repeat_interleave(rep, dim=1).transpose(0, 1)[None]
        k = torch.cat([self.k_cache, k], dim=2)
        v = torch.cat([self.v_cache, v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v)  # [1, H, T, hd]
        x = x + self.o(a[0].transpose(0, 1).reshape(t, self.d))
        h = self._rms(x, self.n2)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def layer_params(d: int, inter: int, heads: int, kv_heads: int) -> int:
    hd = d // heads
    return 2 * d * d + 2 * d * kv_heads * hd + 3 * d * inter


# --- steering scenarios ---------------------------------------------------------------------------------------------


def prepare_step(planner, plans: dict, req_ids, wires, num_prompt, query_start, num_computed) -> int:
    """What Steerer.prepare runs on its SlotPlanner, with plans looked up by wire instead of compiled: the
    planner reports what changed, leaving requests give their slots back, entering ones are admitted (one at a
    time if they do not fit together), then the step is written. Returns the steered token rows."""
    from steer_plugin.engine.slots import Newcomer

    changes = planner.diff(req_ids, wires)
    if not changes.steady:
        planner.release_many(changes.leaving)
        newcomers = [
            Newcomer(req_ids[i], wires[i], int(num_prompt[i]), plans[wires[i]]) for i in changes.entering
        ]
        for n in planner.admit(newcomers):
            taken = planner.take(*n)
            if taken.refused is not None:
                print(f"{n.req_id}: {taken.refused}", file=sys.stderr)
    return planner.write(req_ids, wires, query_start, num_computed)


class Scenario:
    """A batch of T token rows split into min(T, C) requests, one distinct config each: `add` of one feature or
    `clamp` of K features (distinct feature indices per config), at positions past the prompt (decode-like)."""

    def __init__(self, tokens: int, configs: int, kind: str, ops: int, d_sae: int, bank):
        from steer_plugin.engine.tables import OP_NAMES, LayerPlan

        self.tokens, self.configs, self.kind, self.ops = tokens, configs, kind, ops
        requests = max(1, min(tokens, configs))
        self.query_start = np.linspace(0, tokens, requests + 1).round().astype(np.int64)
        self.num_computed = np.full(requests, 100, dtype=np.int64)
        self.num_prompt = np.full(requests, 50, dtype=np.int64)
        self.plans = {}
        for j in range(requests):
            feats = [((j * ops + k) * 7919 + 13) % d_sae for k in range(ops)]
            value = 1.0 + 0.01 * j
            self.plans[f"w{j}"] = {
                LAYER: LayerPlan(
                    bank_rows=np.array([bank.row("feature", "sae", f) for f in feats], dtype=np.int64),
                    coef=np.array(
                        [[0.0, value, 0.0] if kind == "add" else [-1.0, value, 0.0]] * ops, np.float32
                    ),
                    positions=np.zeros(ops, dtype=np.int8),  # "all"
                    last_n=np.zeros(ops, dtype=np.int64),
                    op_codes=np.full(ops, OP_NAMES.index(kind), dtype=np.int8),
                )
            }
        self.wires = list(self.plans)
        self._generation = 0

    def req_ids(self, fresh: bool) -> list[str]:
        """The batch's request ids; fresh=True: all new requests (every slot changes hands)."""
        if fresh:
            self._generation += 1
        return [f"g{self._generation}-r{j}" for j in range(len(self.wires))]

    def write(self, planner, fresh: bool = False) -> int:
        return prepare_step(
            planner,
            self.plans,
            self.req_ids(fresh),
            self.wires,
            self.num_prompt,
            self.query_start,
            self.num_computed,
        )


def scenarios(token_list, config_list, clamp_list) -> list[tuple[int, int, str, int]]:
    """(tokens, configs, op, ops per config)."""
    out = []
    for t in token_list:
        for c in sorted({min(c, t) for c in config_list}):
            out.append((t, c, "add", 1))
            for k in clamp_list:
                out.append((t, c, "clamp", k))
    return out


# --- main -------------------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    cpu = cpu_model()
    commit, dirty = git_state()
    info = {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "uncommitted_engine_files": dirty,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes: d_model 256, 1024 features, a few points"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--cuda-graph", action="store_true", help="CUDA: capture the op once per token count, time replays"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--d-model", type=int)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--context", type=int, help="cached tokens each new token attends to in the layer")
    p.add_argument("--tokens", help="comma list (default 1,16,128,512)")
    p.add_argument("--configs", help="comma list of distinct configs per batch (default 1,16,256)")
    p.add_argument("--clamp", help="comma list of clamped features per config (default 1,8,64)")
    p.add_argument(
        "--table-width",
        type=int,
        default=8,
        help="ops slots per token in the tables (the server's limits.max_ops_per_layer, default 8)",
    )
    p.add_argument(
        "--working-set", type=int, help="working-set rows per layer (default: configs x ops per layer)"
    )
    p.add_argument("--min-time", type=float, help="seconds of timing per point (default 0.3; smoke 0.02)")
    p.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "op-cpu"), help="output path without extension"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fixed-shape",
        action="store_true",
        help="time the fixed-shape op (the form a CUDA graph captures; forced as the tests force it) beside the "
        "eager op and the former fixed-shape op, by live rows (see op_fixed_shape.py)",
    )
    p.add_argument("--max-seqs", type=int, help="--fixed-shape: slots (max_num_seqs; default 256)")
    p.add_argument(
        "--live", help="--fixed-shape: comma list of live (steered) rows, 'all' = T (default 0,1,4,16,64,all)"
    )
    p.add_argument(
        "--from-json", help="no run: rewrite OUT.md from an earlier run's JSON (e.g. after adding notes)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_given = args.out != parse_args([]).out
    if args.from_json:
        src = Path(args.from_json)
        out = Path(args.out) if out_given else src.with_suffix("")
        data = json.loads(src.read_text())
        if "live" in data["settings"]:  # a --fixed-shape run
            import op_fixed_shape

            op_fixed_shape.write_markdown(out.with_suffix(".md"), data)
        else:
            write_markdown(out.with_suffix(".md"), data)
        print(f"wrote {out.with_suffix('.md')}")
        return 0
    if args.fixed_shape:
        import op_fixed_shape

        if not out_given:
            args.out = None
        return op_fixed_shape.run(args)
    smoke = args.smoke
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("op_bench: --device cuda, but torch sees no GPU here", file=sys.stderr)
        return 2
    if args.cuda_graph and device.type != "cuda":
        print("op_bench: --cuda-graph needs --device cuda", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    d = args.d_model or (256 if smoke else 4096)
    d_sae = args.d_sae or (1024 if smoke else 65536)
    inter = args.intermediate or (512 if smoke else 14336)
    heads = args.heads or (4 if smoke else 32)
    kv_heads = args.kv_heads or (2 if smoke else 8)
    context = args.context or (16 if smoke else 256)
    token_list = [int(x) for x in (args.tokens or ("1,8" if smoke else "1,16,128,512,2048,8192")).split(",")]
    config_list = [int(x) for x in (args.configs or ("1,4" if smoke else "1,16,256")).split(",")]
    clamp_list = [int(x) for x in (args.clamp or ("1,4" if smoke else "1,8,64")).split(",")]
    min_time = args.min_time if args.min_time is not None else (0.02 if smoke else 0.3)
    max_tokens = max(token_list)

    import steer_plugin.engine.op as steer_op  # registers torch.ops.steer_plugin.steer_residual
    from steer_plugin.engine.bank import build_layer_bank
    from steer_plugin.engine.slots import SlotPlanner
    from steer_plugin.engine.step import StepMetadata
    from steer_plugin.engine.tables import LayerTables

    t_start = time.perf_counter()
    machine = machine_info(device)
    print(
        f"op_bench: {machine['cpu_model']}, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}",
        flush=True,
    )
    print(
        f"  d_model {d}, d_sae {d_sae}, {args.dtype}; layer: intermediate {inter}, {heads}/{kv_heads} heads, context {context}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    sae = random_topk_sae(d, d_sae, dtype)
    bank = build_layer_bank(LAYER, [("sae", sae)], [], device, dtype)
    w_enc_dev = sae.W_enc.to(device)  # for the encode reference
    del sae
    print(f"  bank built in {time.perf_counter() - t:.1f}s ({bank.nbytes() / 2**20:.0f} MiB)", flush=True)
    # The server's sizes: one slot per running request, K = limits.max_ops_per_layer ops per slot, a working set
    # that holds every slot's every op (what the op multiplies over is only the live part of it, when eager).
    max_slots = max(max(config_list), 1)
    max_ops = max([args.table_width, *clamp_list])
    capacity = args.working_set or min(max_slots * max_ops, bank.num_rows)
    step = StepMetadata(max_tokens, max_slots, device)
    tables = LayerTables(bank, max_slots, max_ops, capacity, device)
    planner = SlotPlanner(step, {LAYER: tables})
    rt = steer_op.LayerRuntime(tables, step, observable=True)
    steer_op.LAYERS.clear()
    steer_op.LAYERS[LAYER] = rt
    op = torch.ops.steer_plugin.steer_residual
    layer_mod = LlamaLikeLayer(d, inter, heads, kv_heads, context, dtype, device).eval()

    per_tokens: dict[int, dict] = {}
    rows: list[dict] = []
    verify: list[dict] = []
    timer = (
        (lambda fn: time_cuda_events(fn, min_time))
        if args.cuda_graph
        else (lambda fn: time_fn(fn, device, min_time))
    )
    host = torch.device("cpu")
    with torch.inference_mode():
        for T in token_list:
            hidden = torch.randn(T, d, dtype=dtype, device=device)
            residual = torch.randn(T, d, dtype=dtype, device=device) * 4
            layer_fn = lambda: layer_mod(residual)  # noqa: B023, E731
            enc_fn = lambda: torch.topk(residual @ w_enc_dev, 64, dim=-1)  # noqa: B023, E731
            if args.cuda_graph:  # the model side replays graphs too
                layer_fn, enc_fn = graph_of(layer_fn)[0].replay, graph_of(enc_fn)[0].replay
            layer_t = timer(layer_fn)
            enc_t = timer(enc_fn)
            planner.clear()
            graph = None
            if args.cuda_graph:  # captured once per token count with nothing steered; replays read the tables
                graph = graph_of(lambda: op(hidden, residual, LAYER))  # noqa: B023
                graph[0].replay()
                torch.cuda.synchronize()
                ok = torch.equal(graph[1], residual)
                verify.append({"tokens": T, "configs": 0, "op": "none", "ops": 0, "ok": ok})
            none_fn = graph[0].replay if graph else (lambda: op(hidden, residual, LAYER))  # noqa: B023
            none_t = timer(none_fn)
            per_tokens[T] = {"layer": layer_t, "encode_topk": enc_t, "op_unsteered": none_t}
            print(
                f"T={T:4d}: layer {layer_t['median_us'] / 1e3:9.2f} ms  SAE encode+topk {enc_t['median_us'] / 1e3:8.2f} ms  "
                f"op unsteered {none_t['median_us']:8.1f} us",
                flush=True,
            )
            for tokens, configs, kind, k in scenarios([T], config_list, clamp_list):
                sc = Scenario(tokens, configs, kind, k, d_sae, bank)
                planner.clear()
                sc.write(planner)
                steady_t = time_fn(lambda: sc.write(planner), host, min(min_time, 0.1))  # noqa: B023
                change_t = time_fn(lambda: sc.write(planner, fresh=True), host, min(min_time, 0.1))  # noqa: B023
                if args.cuda_graph:
                    check = verify_replay(op, *graph, hidden, residual, step)
                    verify.append({"tokens": tokens, "configs": configs, "op": kind, "ops": k, **check})
                    op_t = timer(graph[0].replay)
                else:
                    op_t = timer(lambda: op(hidden, residual, LAYER))  # noqa: B023
                row = {
                    "tokens": tokens,
                    "configs": configs,
                    "op": kind,
                    "ops_per_token": k,
                    "working_set": tables.width,
                    "prepare_steady_us": steady_t["median_us"],
                    "prepare_all_new_us": change_t["median_us"],
                    "op_us": op_t["median_us"],
                    "op_min_us": op_t["min_us"],
                    "op_reps": op_t["reps"],
                    "layer_us": layer_t["median_us"],
                    "op_over_layer": op_t["median_us"] / layer_t["median_us"],
                    "op_over_limit": op_t["median_us"]
                    / physical_limit_us(
                        kind, k, d, 2 * layer_params(d, inter, heads, kv_heads), layer_t["median_us"]
                    ),
                }
                rows.append(row)
                print(
                    f"  {kind:>5} x{k:<3} configs {configs:4d} (U={tables.width:5d}): prepare {steady_t['median_us']:7.1f} us"
                    f" steady, {change_t['median_us']:8.1f} us all new;  op {op_t['median_us']:9.1f} us = "
                    f"{100 * row['op_over_layer']:6.2f}% of a layer, {row['op_over_limit']:6.1f}x the limit",
                    flush=True,
                )
            planner.clear()

    result = {
        "machine": machine,
        "settings": {
            "device": str(device),
            "cuda_graph": args.cuda_graph,
            "dtype": args.dtype,
            "d_model": d,
            "d_sae": d_sae,
            "intermediate": inter,
            "heads": heads,
            "kv_heads": kv_heads,
            "context": context,
            "tokens": token_list,
            "configs": config_list,
            "clamp": clamp_list,
            "max_ops_per_layer": max_ops,
            "working_set_capacity": capacity,
            "min_time_s": min_time,
            "smoke": smoke,
            "layer_params": layer_params(d, inter, heads, kv_heads),
            "sae_encode_flops_per_token": 2 * d * d_sae,
            "layer_flops_per_token": 2 * layer_params(d, inter, heads, kv_heads),
        },
        "per_tokens": {str(k): v for k, v in per_tokens.items()},
        "rows": rows,
        "cuda_graph_verification": verify,
        "wall_s": time.perf_counter() - t_start,
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(out.with_suffix(".md"), result)
    print(
        f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {result['wall_s']:.0f}s",
        flush=True,
    )
    if verify and not all(v["ok"] for v in verify):
        print(
            "op_bench: CUDA graph replay did not match the eager op (see cuda_graph_verification)",
            file=sys.stderr,
        )
        return 1
    return 0


# --- CUDA graphs -------------------------------------------------------------------------------------------------------


def graph_of(fn):
    """(graph, static output) of fn captured after two warm-up calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    torch.cuda.synchronize()
    return graph, static_out


def verify_replay(op, graph, static_out, hidden, residual, step) -> dict:
    """Replay with the current tables; compare every token row with the eager op on the same tables."""
    graph.replay()
    torch.cuda.synchronize()
    eager = op(hidden, residual, LAYER)
    torch.cuda.synchronize()
    mask = step.token_slot[: residual.shape[0]] != step.null_slot
    diff = (static_out.float() - eager.float()).abs().amax(dim=-1)  # [T]
    scale = (eager.float() - residual.float()).abs().amax(dim=-1).clamp_min(1e-3)  # delta size per token
    tol = 2e-2 if residual.dtype != torch.float32 else 1e-4
    steered_ok = bool(((diff / (scale + residual.float().abs().amax(dim=-1))) <= tol)[mask].all())
    unsteered_exact = bool(torch.equal(static_out[~mask], residual[~mask]))
    return {
        "ok": steered_ok and unsteered_exact,
        "steered_rows": int(mask.sum()),
        "max_abs_diff": float(diff.max()),
        "exact_unsteered": unsteered_exact,
    }


def physical_limit_us(kind: str, k: int, d: int, layer_flops_per_token: int, layer_us: float) -> float:
    """The op's least time at the decoder layer's own measured FLOP rate: an add needs d FLOPs per token, a clamp
    of k features 4·k·d (read k features, write k directions)."""
    op_flops_per_token = d if kind == "add" else 4 * k * d
    return layer_us * op_flops_per_token / layer_flops_per_token


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def memory_floor_us(row: dict, settings: dict, bytes_per_us: float) -> float:
    """The op's least time set by memory traffic, at the decoder layer's own byte rate at T=1 (where the layer
    only streams its weights): every distinct feature in the working set needs its decoder row (and, for a clamp,
    its encoder row) read once per step, in the model's dtype, and each steered token's residual row is read and
    written (a clamp also reads the layer output). The FLOP limit misses this: with U distinct features the rows
    alone are U·d·2 values per step, whatever the token count."""
    d, width = settings["d_model"], DTYPE_BYTES[settings["dtype"]]
    reads = row["op"] != "add"
    row_bytes = row["working_set"] * d * width * (2 if reads else 1)
    token_bytes = row["tokens"] * d * width * (3 if reads else 2)
    return (row_bytes + token_bytes) / bytes_per_us


def layer_bytes_per_us(result: dict) -> float | None:
    """Weight bytes of the reference layer over its time at T=1 (a decode step streams its weights once)."""
    s = result["settings"]
    one = result["per_tokens"].get("1") or result["per_tokens"].get(1)
    if one is None:
        return None
    return s["layer_params"] * DTYPE_BYTES[s["dtype"]] / one["layer"]["median_us"]


# --- report --------------------------------------------------------------------------------------------------------------


def write_markdown(path: Path, result: dict) -> None:
    m, s = result["machine"], result["settings"]
    mode = "CUDA graph replay" if s["cuda_graph"] else f"eager on {s['device']}"
    lines = [
        f"# Steering op microbenchmark ({s['device']})",
        "",
        date_and_commit_line(m),
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads"
        + (f"; GPU {m['gpu']}" if "gpu" in m else ""),
        f"- Sizes: d_model {s['d_model']}, SAE {s['d_sae']} features, {s['dtype']}; op timed as {mode}.",
        f"- Reference layer: Llama-like, intermediate {s['intermediate']}, {s['heads']} heads / {s['kv_heads']} KV heads, "
        f"attention over {s['context']} cached tokens + the new ones ({s['layer_params'] / 1e6:.0f}M parameters, "
        f"{s['layer_flops_per_token'] / 1e6:.0f} MFLOP/token). A full SAE encode is {s['sae_encode_flops_per_token'] / 1e6:.0f} "
        "MFLOP/token.",
        "- Batch of T token rows split into min(T, C) requests, one distinct config each (C distinct configs); `add` = one "
        "feature per config, `clamp xK` = K features per config. U = working-set columns the op multiplies over. "
        "prepare = host SlotPlanner steps of Steerer.prepare for the step "
        "(steady: the same requests as the last step; all new: "
        "every request new, every slot changes hands at this layer). op = torch.ops.steer_plugin.steer_residual; "
        "% = op time / decoder-layer time; × limit = op time / (the op's FLOPs, d per token for an add and 4·k·d "
        "for a clamp of k, at the decoder layer's measured FLOP rate); memory floor = the larger of that FLOP limit and the "
        "op's least memory traffic (each working-set row's decoder row, and encoder row for a clamp, in the model's "
        "dtype, plus the steered residual rows) at the layer's byte rate at T=1 (its weights over its time), as a "
        "share of the layer; × floor = op time over it.",
        f"- Load average at start/end: {m['loadavg_start'][0]:.1f} / {m['loadavg_end'][0]:.1f}; wall {result['wall_s']:.0f}s.",
        "",
        "## Per token count",
        "",
        "| T | decoder layer | SAE encode + top-k (inspect) | encode / layer | op, nothing steered | unsteered op / layer |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for T, v in result["per_tokens"].items():
        lay, enc, none = (
            v["layer"]["median_us"],
            v["encode_topk"]["median_us"],
            v["op_unsteered"]["median_us"],
        )
        lines.append(
            f"| {T} | {lay / 1e3:.2f} ms | {enc / 1e3:.2f} ms | {enc / lay:.2f}× | {none:.1f} µs | {100 * none / lay:.2f}% |"
        )
    lines += [
        "",
        "## Steered",
        "",
        "| T | configs | op | U | prepare, steady | prepare, all new | op | op / layer | × limit "
        "| memory floor / layer | × floor |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rate = layer_bytes_per_us(result)
    for r in result["rows"]:
        floor = "– | –"
        if rate:
            floor_us = max(memory_floor_us(r, s, rate), r["op_us"] / r["op_over_limit"])
            floor = f"{100 * floor_us / r['layer_us']:.2f}% | {r['op_us'] / floor_us:.1f}"
        lines.append(
            f"| {r['tokens']} | {r['configs']} | {r['op']} x{r['ops_per_token']} | {r['working_set']} | "
            f"{_fmt_us(r['prepare_steady_us'])} | {_fmt_us(r['prepare_all_new_us'])} | {_fmt_us(r['op_us'])} | "
            f"{100 * r['op_over_layer']:.2f}% | {r['op_over_limit']:.1f} | {floor} |"
        )
    if result["cuda_graph_verification"]:
        ok = sum(1 for v in result["cuda_graph_verification"] if v["ok"])
        lines += [
            "",
            f"CUDA graph replays matching the eager op per token: {ok}/{len(result['cuda_graph_verification'])}.",
        ]
    lines.append("")
    notes = path.parent / f"{path.stem}-notes.md"  # interpretation written by a person, kept across re-runs
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    path.write_text("\n".join(lines))


def _fmt_us(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


if __name__ == "__main__":
    sys.exit(main())
