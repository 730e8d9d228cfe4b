"""op_bench --fixed-shape: the fixed-shape op (the form a CUDA graph captures) beside the eager op.

    python benchmarks/op_bench.py --fixed-shape                     # d_model 4096, 256 slots x 8 ops, T=1,16,128,512
    python benchmarks/op_bench.py --fixed-shape --smoke --out /tmp/fixed-smoke
    python benchmarks/op_bench.py --fixed-shape --device cuda --cuda-graph --out benchmarks/results/op-fixed-shape-cuda

The fixed-shape op is forced as the tests force it (steer_plugin.engine.op._capturing patched to True). Off a
real capture its gates read the host copies of the flags that the step wrote (engine/gate.py), so it runs
exactly the tensor work a CUDA-graph replay would run. The server's sizes: max_num_seqs slots, K =
limits.max_ops_per_layer entries per slot and the default working set of max_num_seqs x K rows. A batch of T
token rows is min(T, max_num_seqs) requests; `live` rows of them belong to steered requests (whole requests,
spread over the batch), each with its own config: `add` of one feature or `clamp` of k features. Timed per
point, each over the same decoder layer's time: the eager op, the fixed-shape op, and (at 0, 1 and all live
rows) the former fixed-shape op (every row times the whole working set: x @ enc[:capacity]^T and
C @ dec[:capacity], called directly, without the custom op's dispatch). Every fixed-shape output is checked
against the eager op's (steered rows within the dtype's tolerance, every other row bit for bit).
With --cuda-graph (CUDA): the fixed-shape column is the replay of a graph captured once per T with nothing
steered (every lane branch recorded into conditional nodes), the layer is replayed from its own graph, and GPU
times come from CUDA events.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import date_and_commit_line
from op_bench import (
    LlamaLikeLayer,
    graph_of,
    layer_params,
    machine_info,
    prepare_step,
    random_topk_sae,
    time_cuda_events,
    time_fn,
)

LAYER = 0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "op-fixed-shape-cpu"


class OtherCPU:
    """Share of the machine's CPU time that other processes used since the last reading (Linux /proc): on a
    shared machine, a timing taken while others ran is not a clean one."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        return busy, float(own[11]) + float(own[12]), sum(fields)  # own utime + stime (fields 14, 15)

    def share(self) -> float | None:
        """Others' busy time / all CPU time since the last call (0..1), None without /proc."""
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[2] <= last[2]:
            return None
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2])


class LiveRows:
    """A batch of T rows split into min(T, max_seqs) equal requests at decode positions (past the prompt);
    whole requests are steered until `live` rows are (spread evenly over the batch), one config each."""

    def __init__(self, tokens: int, max_seqs: int, live: int, kind: str, ops: int, d_sae: int, bank):
        from steer_plugin.engine.tables import OP_NAMES, LayerPlan

        requests = min(tokens, max_seqs)
        per = tokens // requests
        assert per * requests == tokens, "T must be a multiple of the request count"
        steered = -(-live // per)  # whole requests
        chosen = set(np.linspace(0, requests - 1, steered).round().astype(int).tolist()) if steered else set()
        self.live_rows = len(chosen) * per
        self.query_start = np.arange(requests + 1, dtype=np.int64) * per
        self.num_computed = np.full(requests, 100, dtype=np.int64)
        self.num_prompt = np.full(requests, 50, dtype=np.int64)
        self.plans = {}
        self.wires: list[str | None] = []
        for j in range(requests):
            if j not in chosen:
                self.wires.append(None)
                continue
            feats = [((j * ops + i) * 7919 + 13) % d_sae for i in range(ops)]
            coef = [[0.0, 1.0 + 0.01 * j, 0.0] if kind == "add" else [-1.0, 1.0 + 0.01 * j, 0.0]] * ops
            self.plans[f"w{j}"] = {
                LAYER: LayerPlan(
                    bank_rows=np.array([bank.row("feature", "sae", f) for f in feats], dtype=np.int64),
                    coef=np.array(coef, np.float32),
                    positions=np.zeros(ops, dtype=np.int8),  # "all"
                    last_n=np.zeros(ops, dtype=np.int64),
                    op_codes=np.full(ops, OP_NAMES.index(kind), dtype=np.int8),
                )
            }
            self.wires.append(f"w{j}")
        self.req_ids = [f"r{j}" for j in range(requests)]

    def write(self, planner) -> int:
        return prepare_step(
            planner,
            self.plans,
            self.req_ids,
            self.wires,
            self.num_prompt,
            self.query_start,
            self.num_computed,
        )


def former_fixed_shape(rt, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The fixed-shape op before lanes (git 971c024): every row times the whole working set."""
    from steer_plugin.engine.delta import ALL_TERMS
    from steer_plugin.engine.op import steer_rows

    num_tokens = residual.shape[0]
    x = hidden.float() + residual.float()
    step = rt.step
    out, steered, first_delta = steer_rows(
        rt,
        x,
        residual,
        step.token_slot[:num_tokens],
        step.token_pos[:num_tokens],
        rt.tables.capacity,
        ALL_TERMS,
        position_rules=True,
    )
    rt.probe[1].copy_(first_delta * steered[0])
    if rt.observable:
        rt.capture[:num_tokens].copy_(hidden.float() + out.float())
    return out


def check(fixed: torch.Tensor, eager: torch.Tensor, residual: torch.Tensor, steered_rows: np.ndarray) -> dict:
    """The fixed-shape output against the eager op's: steered rows within the dtype's tolerance (relative to
    the row's size), every other row bit for bit."""
    mask = torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
    mask[torch.from_numpy(steered_rows).to(residual.device)] = True
    diff = (fixed.float() - eager.float()).abs().amax(dim=-1)  # [T]
    scale = eager.float().abs().amax(dim=-1).clamp_min(1e-3)
    tol = 2e-2 if residual.dtype != torch.float32 else 1e-4
    steered_ok = bool(((diff / scale) <= tol)[mask].all())
    exact = bool(torch.equal(fixed[~mask], residual[~mask])) and bool(
        torch.equal(eager[~mask], residual[~mask])
    )
    return {"ok": steered_ok and exact, "max_abs_diff": float(diff.max()) if diff.numel() else 0.0}


def live_counts(tokens: int, wanted: list[str]) -> list[int]:
    out = {tokens if w == "all" else int(w) for w in wanted}
    return sorted(n for n in out if n <= tokens)


def run(args) -> int:
    """The --fixed-shape mode of op_bench (see the module docstring)."""
    import steer_plugin.engine.op as steer_op
    from steer_plugin.engine.bank import build_layer_bank
    from steer_plugin.engine.slots import SlotPlanner
    from steer_plugin.engine.step import StepMetadata
    from steer_plugin.engine.tables import LayerTables

    smoke = args.smoke
    device = torch.device(args.device)
    if args.cuda_graph and (device.type != "cuda" or not torch.cuda.is_available()):
        print("op_bench --fixed-shape: --cuda-graph needs --device cuda and a GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    d = args.d_model or (256 if smoke else 4096)
    d_sae = args.d_sae or (1024 if smoke else 65536)
    inter = args.intermediate or (512 if smoke else 14336)
    heads, kv_heads = args.heads or (4 if smoke else 32), args.kv_heads or (2 if smoke else 8)
    context = args.context or (16 if smoke else 256)
    max_seqs = args.max_seqs or (16 if smoke else 256)
    token_list = [int(x) for x in (args.tokens or ("1,8,32" if smoke else "1,16,128,512")).split(",")]
    wanted_live = (args.live or ("0,1,4,all" if smoke else "0,1,4,16,64,all")).split(",")
    clamp_list = [int(x) for x in (args.clamp or ("4" if smoke else "8")).split(",")]
    min_time = args.min_time if args.min_time is not None else (0.02 if smoke else 0.3)
    max_ops = max([args.table_width, *clamp_list])
    capacity = args.working_set or max_seqs * max_ops  # the server's default working set
    t_start = time.perf_counter()
    machine = machine_info(device)
    print(
        f"op_bench --fixed-shape: {machine['cpu_model']}, torch {torch.__version__}, load {os.getloadavg()}"
    )
    torch.manual_seed(args.seed)
    sae = random_topk_sae(d, d_sae, dtype)
    bank = build_layer_bank(LAYER, [("sae", sae)], [], device, dtype)
    del sae
    step = StepMetadata(max(token_list), max_seqs, device)
    tables = LayerTables(bank, max_seqs, max_ops, capacity, device)
    planner = SlotPlanner(step, {LAYER: tables})
    rt = steer_op.LayerRuntime(tables, step, observable=True)
    steer_op.LAYERS.clear()
    steer_op.LAYERS[LAYER] = rt
    op = torch.ops.steer_plugin.steer_residual
    real_capturing = steer_op._capturing
    layer_mod = LlamaLikeLayer(d, inter, heads, kv_heads, context, dtype, device).eval()
    host = torch.device("cpu")
    per_tokens, rows = {}, []
    others = OtherCPU()

    def timed(fn, capturing: bool) -> dict:
        steer_op._capturing = lambda: capturing
        try:
            return time_fn(fn, device, min_time)
        finally:
            steer_op._capturing = real_capturing

    def run_op(capturing: bool) -> torch.Tensor:
        if capturing and graph is not None:  # the replay reads the tables and lanes written since capture
            graph[0].replay()
            torch.cuda.synchronize()
            return graph[1].clone()
        steer_op._capturing = lambda: capturing
        try:
            return op(hidden, residual, LAYER)  # noqa: B023
        finally:
            steer_op._capturing = real_capturing

    graph = None

    with torch.inference_mode():
        for T in token_list:
            hidden = torch.randn(T, d, dtype=dtype, device=device)
            residual = torch.randn(T, d, dtype=dtype, device=device) * 4
            if args.cuda_graph:  # the layer replays a graph too; captured ops with nothing steered
                layer_t = time_cuda_events(graph_of(lambda: layer_mod(residual))[0].replay, min_time)  # noqa: B023
                planner.clear()
                graph = graph_of(lambda: op(hidden, residual, LAYER))  # noqa: B023
            else:
                layer_t = time_fn(lambda: layer_mod(residual), device, min_time)  # noqa: B023
            per_tokens[T] = {"layer": layer_t, "loadavg": os.getloadavg(), "other_cpu": others.share()}
            print(f"T={T:4d}: layer {layer_t['median_us'] / 1e3:9.2f} ms", flush=True)
            lives = live_counts(T, wanted_live)
            for kind, k in [("add", 1)] + [("clamp", k) for k in clamp_list]:
                for live in lives:
                    others.share()
                    sc = LiveRows(T, max_seqs, live, kind, k, d_sae, bank)
                    planner.clear()
                    sc.write(planner)
                    prepare_t = time_fn(lambda: sc.write(planner), host, min(min_time, 0.1))  # noqa: B023
                    eager_t = timed(lambda: op(hidden, residual, LAYER), False)  # noqa: B023
                    if graph is not None:
                        fixed_t = time_cuda_events(graph[0].replay, min_time)
                    else:
                        fixed_t = timed(lambda: op(hidden, residual, LAYER), True)  # noqa: B023
                    verdict = check(run_op(True), run_op(False), residual, step.steered_rows_host)
                    former_t = None
                    if live in (0, 1, lives[-1]):
                        former_t = time_fn(
                            lambda: former_fixed_shape(rt, hidden, residual),  # noqa: B023
                            device,
                            min_time,
                        )
                    layer_us = layer_t["median_us"]
                    row = {
                        "tokens": T,
                        "op": kind,
                        "ops_per_token": k,
                        "live_rows": sc.live_rows,
                        "working_set": tables.width,
                        "prepare_steady_us": prepare_t["median_us"],
                        "eager_us": eager_t["median_us"],
                        "fixed_us": fixed_t["median_us"],
                        "eager_min_us": eager_t["min_us"],
                        "fixed_min_us": fixed_t["min_us"],
                        "former_us": former_t["median_us"] if former_t else None,
                        "former_min_us": former_t["min_us"] if former_t else None,
                        "layer_us": layer_us,
                        "eager_over_layer": eager_t["median_us"] / layer_us,
                        "fixed_over_layer": fixed_t["median_us"] / layer_us,
                        "former_over_layer": former_t["median_us"] / layer_us if former_t else None,
                        "fixed_matches_eager": verdict["ok"],
                        "max_abs_diff": verdict["max_abs_diff"],
                        "loadavg": os.getloadavg()[0],
                        "other_cpu": others.share(),
                    }
                    rows.append(row)
                    former = f"{100 * row['former_over_layer']:7.2f}%" if former_t else "      –"
                    print(
                        f"  {kind:>5} x{k:<2} live {sc.live_rows:4d} (U={tables.width:5d}): eager "
                        f"{row['eager_us']:9.1f} us {100 * row['eager_over_layer']:6.2f}%  fixed "
                        f"{row['fixed_us']:9.1f} us {100 * row['fixed_over_layer']:6.2f}%  former {former}"
                        f"  {'ok' if verdict['ok'] else 'MISMATCH'}",
                        flush=True,
                    )
            planner.clear()
    result = {
        "machine": machine,
        "settings": {
            "device": str(device),
            "cuda_graph": bool(args.cuda_graph),
            "dtype": args.dtype,
            "d_model": d,
            "d_sae": d_sae,
            "intermediate": inter,
            "heads": heads,
            "kv_heads": kv_heads,
            "context": context,
            "tokens": token_list,
            "live": wanted_live,
            "clamp": clamp_list,
            "max_num_seqs": max_seqs,
            "max_ops_per_layer": max_ops,
            "working_set_capacity": capacity,
            "lane_buckets": list(step.lanes.sizes),
            "min_time_s": min_time,
            "smoke": smoke,
            "layer_params": layer_params(d, inter, heads, kv_heads),
        },
        "per_tokens": {str(k): v for k, v in per_tokens.items()},
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out) if args.out else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(out.with_suffix(".md"), result)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {result['wall_s']:.0f}s")
    if not all(r["fixed_matches_eager"] for r in rows):
        print(
            "op_bench: the fixed-shape op did not match the eager op (see fixed_matches_eager)",
            file=sys.stderr,
        )
        return 1
    return 0


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _us(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1e3:.2f} ms" if value >= 1e4 else f"{value:.1f} µs"


def write_markdown(path: Path, result: dict) -> None:
    m, s = result["machine"], result["settings"]
    lines = [
        f"# Fixed-shape steering op (the CUDA-graph form) beside the eager op ({s['device']})",
        "",
        date_and_commit_line(m),
        f"- Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads.",
        f"- Sizes: d_model {s['d_model']}, SAE {s['d_sae']} features, {s['dtype']}; {s['max_num_seqs']} slots "
        f"(max_num_seqs) x {s['max_ops_per_layer']} ops per slot, working set {s['working_set_capacity']} rows "
        f"(the default, max_num_seqs x max_ops_per_layer); lane buckets {', '.join(map(str, s['lane_buckets']))}.",
        f"- Reference layer: Llama-like, intermediate {s['intermediate']}, {s['heads']} heads / {s['kv_heads']} "
        f"KV heads, attention over {s['context']} cached tokens + the new ones "
        f"({s['layer_params'] / 1e6:.0f}M parameters).",
        "- A batch of T rows is min(T, max_num_seqs) requests at decode positions; `live` rows belong to steered "
        "requests (spread over the batch), one config each: `add x1` = one feature, `clamp xk` = k features. "
        "U = working-set columns in use. eager = the op outside a capture (host decisions); fixed-shape = "
        + (
            "the replay of a graph captured once per T with nothing steered; "
            if s.get("cuda_graph")
            else "the op forced into its captured form (gates read the flags' host copies: the work a replay runs); "
        )
        + "former = the fixed-shape op before lanes (every row x the whole working set, measured at 0, 1 and all "
        "live rows). % = op time / decoder-layer time in the same run. prepare = host "
        "SlotPlanner steps of Steerer.prepare (steady decode), lanes included. "
        "Check: fixed-shape output = eager output "
        "(steered rows within the dtype's tolerance, other rows bit for bit). others' CPU = share of the "
        "machine's CPU time used by other processes while that point was timed (a shared machine: 0% is clean).",
        f"- Load average (1 min) at start/end: {m['loadavg_start'][0]:.2f} / {m['loadavg_end'][0]:.2f}; "
        f"wall {result['wall_s']:.0f}s.",
        "",
        "| T | decoder layer | load (1 min) | others' CPU |",
        "|---:|---:|---:|---:|",
    ]
    for T, v in result["per_tokens"].items():
        lines.append(
            f"| {T} | {v['layer']['median_us'] / 1e3:.2f} ms | {v['loadavg'][0]:.2f} | {_pct(v.get('other_cpu'))} |"
        )
    lines += [
        "",
        "| T | op | live rows | U | prepare | eager | eager / layer | fixed-shape | fixed / layer "
        "| former | former / layer | check | others' CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokens']} | {r['op']} x{r['ops_per_token']} | {r['live_rows']} | {r['working_set']} | "
            f"{_us(r['prepare_steady_us'])} | {_us(r['eager_us'])} | {_pct(r['eager_over_layer'])} | "
            f"{_us(r['fixed_us'])} | **{_pct(r['fixed_over_layer'])}** | {_us(r['former_us'])} | "
            f"{_pct(r['former_over_layer'])} | {'ok' if r['fixed_matches_eager'] else 'MISMATCH'} | "
            f"{_pct(r.get('other_cpu'))} |"
        )
    lines.append("")
    notes = path.parent / f"{path.stem}-notes.md"  # interpretation written by a person, kept across re-runs
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    path.write_text("\n".join(lines))
