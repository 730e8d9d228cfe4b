"""The analysis and reports of benchmarks/serve_bench.py: per-round ratios against vanilla, the targets' verdicts,
OUT.json, the Markdown tables (OUT.md) and the plot (OUT.png).

Everything here is computed from a run's raw units, so an earlier run's JSON re-renders alone
(`python benchmarks/serve_bench.py --from-json OUT.json`, `rerender`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from machine import date_and_commit_line
from serve_cases import CASE_BY_KEY, CASES, INSPECT_SLACK

# --- analysis ----------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


METRICS = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def _paired(mine: dict, base: dict, metric: str) -> dict | None:
    vals = [
        mine[r][metric] / base[r][metric]
        for r in mine
        if r in base and base[r][metric] and mine[r][metric] is not None
    ]
    return _stats(vals)


# The unsteered unit on the same server as each steered case: the steering's own cost, apart from loading.
LOADED_REFERENCE = {"g_4layers": "g0_4layers_loaded"}


def summarise(units: list[dict], modes: list[str], concs: list[int], cases: list[str]) -> dict:
    """Per (mode, case, concurrency): medians over rounds, and per-round ratios against vanilla's unit of the
    same round (and against the same server's unsteered unit: b_loaded, or g0 for g)."""
    out: dict = {}
    for mode in modes:
        for conc in concs:

            def by_round(case: str) -> dict:
                return {
                    u["round"]: u
                    for u in units
                    if u["mode"] == mode and u["case"] == case and u["concurrency"] == conc  # noqa: B023
                }

            base = by_round("a_vanilla")
            for case in cases:
                mine = by_round(case)
                if not mine:
                    continue
                entry = {m: _stats([u[m] for u in mine.values()]) for m in METRICS}
                entry["ratio_vs_vanilla"] = {m: _paired(mine, base, m) for m in METRICS}
                ref = LOADED_REFERENCE.get(case, "b_loaded")
                entry["ratio_vs_loaded"] = (
                    {m: _paired(mine, by_round(ref), m) for m in METRICS}
                    if case not in ("a_vanilla", ref) and CASE_BY_KEY[case].server != "vanilla"
                    else None
                )
                entry["loaded_reference"] = ref
                entry["errors"] = sum(u["errors"] for u in mine.values())
                entry["disturbed_units"] = sum(1 for u in mine.values() if u["disturbed"])
                entry["inspect_tokens"] = sum(u.get("inspect_tokens", 0) for u in mine.values())
                entry["output_tokens"] = sum(u["output_tokens"] for u in mine.values())
                entry["extra_response_fields"] = sorted(
                    set().union(*(u["extra_response_fields"] for u in mine.values()))
                )
                out.setdefault(mode, {}).setdefault(str(conc), {})[case] = entry
    return out


def model_flops(model_dir: str, d_sae: int, context: int) -> dict:
    """Forward FLOPs per token of a Llama-like model (matmuls + attention over `context`) and of one SAE encode."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, n_layers, inter, vocab = (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or d // heads
    per_layer = (
        2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter) + 4 * context * heads * hd
    )
    model = n_layers * per_layer + 2 * d * vocab
    sae = 2 * d * d_sae  # full encode (x @ W_enc); top-k selection and decode of k rows are negligible
    return {
        "model_flops_per_token": model,
        "sae_encode_flops_per_token": sae,
        "sae_share": sae / model,
        "context": context,
    }


def evaluate_targets(summary: dict, modes: list[str], concs: list[int], flops: dict) -> list[dict]:
    rows = []
    for mode in modes:
        for conc in concs:
            cell = summary.get(mode, {}).get(str(conc), {})
            for case in CASES:
                target = case.target_loss
                note = ""
                if case.key == "h_inspect":
                    target = INSPECT_SLACK * flops["sae_share"]
                entry = cell.get(case.key)
                if target is None or entry is None or entry["ratio_vs_vanilla"]["tok_s"] is None:
                    continue
                r = entry["ratio_vs_vanilla"]["tok_s"]
                loss = 1.0 - r["median"]
                spread = (r["max"] - r["min"]) / 2
                status = "met" if loss <= target else "MISSED"
                if case.key == "h_inspect" and not entry.get("inspect_tokens"):
                    status = "n/a"
                    note = "inspect accepted but ignored: no per-token features in the response"
                elif status == "MISSED" and loss - target <= spread:
                    note = "within the round-to-round spread"
                if r["n"] < 2:
                    note = (note + "; " if note else "") + "one round: no spread"
                disturbed = entry["disturbed_units"] + (cell.get("a_vanilla") or {}).get("disturbed_units", 0)
                if disturbed:
                    note = (note + "; " if note else "") + f"{disturbed} disturbed unit(s)"
                loaded = (entry.get("ratio_vs_loaded") or {}).get("tok_s")
                rows.append(
                    {
                        "mode": mode,
                        "concurrency": conc,
                        "case": case.key,
                        "target_loss": target,
                        "loss": loss,
                        "loss_vs_loaded": None if loaded is None else 1.0 - loaded["median"],
                        "ratio_min": r["min"],
                        "ratio_max": r["max"],
                        "status": status,
                        "note": note,
                    }
                )
    return rows


# --- reports -------------------------------------------------------------------------------------------------------


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def write_markdown(path: Path, result: dict, notes: str | None) -> None:
    m, o = result["machine"], result["options"]
    startups = ", ".join("{}/{} {}s".format(s["mode"], s["server"], s["ready_s"]) for s in result["startups"])
    lines = [
        "# Steering overhead vs plain vLLM (serve_bench)",
        "",
        date_and_commit_line(m),
        f"- Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['mem_gib']} GiB; "
        f"{m['platform']}, Python {m['python']}",
        f"- vLLM {m['vllm']}, torch {m['torch']}",
        f"- Model: `{Path(result['asset_sources']['model']).name}`; SAE `{Path(result['asset_sources']['sae']).name}` "
        f"(from {result['asset_sources']['via']}, copied for the run; {result['setup']['d_sae']} features, layer "
        f"{result['setup']['sae_layer']}); raw vectors for (g) on layers {result['setup']['vector_layers']} "
        "(random unit vectors made by the harness: there is one demo SAE)",
        f"- Modes: {', '.join(o['modes'])}; concurrency {o['concurrencies']}; requests per unit "
        f"{o['requests']}; max_tokens {o['max_tokens']} with ignore_eos; {o['rounds']} round(s), case order shuffled "
        "every round; streaming /v1/completions over loopback, greedy, a unique cache_salt per request.",
        "- Ratios are per round against the vanilla unit of the same round, then the median [min–max] over rounds. "
        "Throughput ratio < 1 is a loss; latency ratio > 1 is a loss. `× (b)` compares a steered case with the "
        "unsteered unit on the same plugin server ((b); (g0) for (g)): the steering's own cost, without whatever "
        "loading the plugin changes.",
        f"- Server start-up to /health (servers of a mode start together): {startups}",
        f"- Other processes' CPU during units: median {result['noise']['foreign_median']:.2f} cores, max "
        f"{result['noise']['foreign_max']:.2f}; disturbed units (>= {o['quiet_threshold']} cores after "
        f"{o['max_retries']} retries): {result['noise']['disturbed_units']}/{result['noise']['units']}; "
        f"waited {result['noise']['waited_s']:.0f}s for quiet and re-ran {result['noise']['retried_s']:.0f}s of units "
        f"(budget {o['noise_budget_s']:.0f}s).",
        f"- Wall time of the run: {result['wall_s'] / 60:.1f} min.",
        "",
    ]
    summary = result["summary"]
    for mode in o["modes"]:
        lines += [f"## Ratios against vanilla: {mode}", ""]
        head = "| case |"
        sep = "|---|"
        for c in o["concurrencies"]:
            head += f" c={c} tok/s × vanilla | c={c} tok/s × (b) | c={c} TTFT p50 × | c={c} ITL p50 × | c={c} ITL p99 × |"
            sep += "---:|---:|---:|---:|---:|"
        lines += [head, sep]
        for case in CASES:
            if case.key not in o["cases"]:
                continue
            row = f"| {case.title} |"
            for c in o["concurrencies"]:
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                if e is None:
                    row += " – | – | – | – | – |"
                    continue
                rv = e["ratio_vs_vanilla"]
                t = rv["tok_s"]
                tp = "–" if t is None else f"{t['median']:.3f} [{t['min']:.3f}–{t['max']:.3f}]"
                tl = (e.get("ratio_vs_loaded") or {}).get("tok_s")
                tlp = "–" if tl is None else f"{tl['median']:.3f} [{tl['min']:.3f}–{tl['max']:.3f}]"
                row += f" {tp} | {tlp} | {_f(rv['ttft_p50_ms'] and rv['ttft_p50_ms']['median'])} |"
                row += f" {_f(rv['itl_p50_ms'] and rv['itl_p50_ms']['median'])} | {_f(rv['itl_p99_ms'] and rv['itl_p99_ms']['median'])} |"
            lines.append(row)
        lines += ["", f"### Absolute numbers: {mode} (median over rounds)", ""]
        lines += [
            "| case | conc | tok/s [min–max] | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case in CASES:
            for c in o["concurrencies"]:
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                if e is None:
                    continue
                t = e["tok_s"]
                lines.append(
                    f"| {case.key} | {c} | {t['median']:.1f} [{t['min']:.1f}–{t['max']:.1f}] | "
                    f"{_f(e['ttft_p50_ms'] and e['ttft_p50_ms']['median'], '{:.1f}')} | {_f(e['ttft_p99_ms'] and e['ttft_p99_ms']['median'], '{:.1f}')} | "
                    f"{_f(e['itl_p50_ms'] and e['itl_p50_ms']['median'], '{:.1f}')} | {_f(e['itl_p99_ms'] and e['itl_p99_ms']['median'], '{:.1f}')} | {e['errors']} |"
                )
        lines.append("")
    fl = result["flops"]
    lines += [
        "## Targets (throughput loss vs vanilla)",
        "",
        f"(h)'s target is {INSPECT_SLACK}× the SAE's share of model FLOPs: a full encode is {fl['sae_encode_flops_per_token'] / 1e6:.1f} "
        f"MFLOP/token against {fl['model_flops_per_token'] / 1e6:.0f} MFLOP/token for the model (context {fl['context']}), "
        f"a share of {fl['sae_share'] * 100:.2f}%, so the target is {INSPECT_SLACK * fl['sae_share'] * 100:.2f}%.",
        "",
        "| mode | conc | case | target | loss vs vanilla (median) | per-round ratio range | status | loss vs (b) | note |",
        "|---|---:|---|---:|---:|---|---|---:|---|",
    ]
    for t in result["targets"]:
        lb = "–" if t.get("loss_vs_loaded") is None else f"{t['loss_vs_loaded'] * 100:+.2f}%"
        lines.append(
            f"| {t['mode']} | {t['concurrency']} | {t['case']} | ≤{t['target_loss'] * 100:.1f}% | {t['loss'] * 100:+.2f}% | "
            f"{t['ratio_min']:.3f}–{t['ratio_max']:.3f} | {t['status']} | {lb} | {t['note']} |"
        )
    lines += ["", "## Inspect (h)", "", result["inspect_note"], ""]
    if result.get("plot"):
        lines += [f"![throughput ratios]({Path(result['plot']).name})", ""]
    else:
        lines += [f"(plot skipped: {result.get('plot_skipped')})", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, result: dict) -> str | None:
    """A bar chart of throughput ratios; returns a reason when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `bench` extra)"
    o, summary = result["options"], result["summary"]
    cases = [c for c in CASES if c.key in o["cases"] and c.key != "a_vanilla"]
    fig, axes = plt.subplots(
        1, len(o["modes"]), figsize=(6.5 * len(o["modes"]), 4.8), squeeze=False, sharey=True
    )
    width = 0.8 / len(o["concurrencies"])
    ratios = [
        v
        for mode in o["modes"]
        for cell in summary.get(mode, {}).values()
        for key, e in cell.items()
        if key != "a_vanilla" and e["ratio_vs_vanilla"]["tok_s"]
        for v in (e["ratio_vs_vanilla"]["tok_s"]["min"], e["ratio_vs_vanilla"]["tok_s"]["max"])
    ] or [1.0]
    lowest, highest = min(ratios), max(ratios)
    for ax, mode in zip(axes[0], o["modes"], strict=True):
        for j, c in enumerate(o["concurrencies"]):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                t = e and e["ratio_vs_vanilla"]["tok_s"]
                if not t:
                    continue
                xs.append(i + (j - (len(o["concurrencies"]) - 1) / 2) * width)
                ys.append(t["median"])
                lo.append(t["median"] - t["min"])
                hi.append(t["max"] - t["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"concurrency {c}")
        for i, case in enumerate(cases):
            target = case.target_loss
            if case.key == "h_inspect":
                target = INSPECT_SLACK * result["flops"]["sae_share"]
            if target is not None:
                ax.hlines(1 - target, i - 0.45, i + 0.45, colors="red", linestyles="dashed", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.key.split("_", 1)[0] for c in cases])
        ax.set_title(f"{mode}: output tok/s relative to vanilla")
        ax.set_ylim(min(0.8, lowest - 0.05), max(1.1, highest + 0.05))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("throughput ratio (median, min–max over rounds)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.text(
        0.01,
        0.01,
        "red dashes: targets. "
        + "; ".join(f"{c.key.split('_', 1)[0]}={c.key.split('_', 1)[1]}" for c in cases),
        fontsize=7,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def inspect_note(summary: dict, units: list[dict]) -> str:
    cells = [cell["h_inspect"] for mode in summary.values() for cell in mode.values() if "h_inspect" in cell]
    if not cells:
        return "(h) was not run."
    errors = sum(c["errors"] for c in cells)
    if errors:
        return f"`inspect` requests failed ({errors} errors); see first_error in the JSON's units."
    records = sum(c.get("inspect_tokens", 0) for c in cells)
    tokens = sum(c.get("output_tokens", 0) for c in cells)
    fields = sorted({f for c in cells for f in c["extra_response_fields"]})
    if not records:
        return (
            'The server accepted `"steering": {"inspect": {"top_k": 5}}` (HTTP 200) but returned no per-token '
            f"features (extra chunk fields seen: {fields or 'none'}), so (h) measures plain serving through the "
            "plugin and its target cannot be judged."
        )
    sample = next(
        (u["inspect_sample"] for u in units if u["case"] == "h_inspect" and u.get("inspect_sample")), None
    )
    text = json.dumps(sample)[:400] if sample is not None else "?"
    return (
        f"Inspect is served: {records} per-token feature records came back in `choices[].steering.tokens` for "
        f"{tokens} generated tokens of (h). First record: `{text}`."
    )


def write_reports(result: dict, out: Path, notes_path: Path | None) -> None:
    """(Re)compute the summary, targets and inspect note from the raw units, and write OUT.json/.md/.png."""
    o = result["options"]
    result["summary"] = summarise(result["units"], o["modes"], o["concurrencies"], o["cases"])
    result["targets"] = evaluate_targets(result["summary"], o["modes"], o["concurrencies"], result["flops"])
    result["inspect_note"] = inspect_note(result["summary"], result["units"])
    png = out.with_suffix(".png")
    skipped = write_plot(png, result)
    result["plot"] = None if skipped else png.name
    result["plot_skipped"] = skipped
    if skipped:
        print(f"plot skipped: {skipped}", flush=True)
    notes_path = notes_path or out.parent / f"{out.name}-notes.md"
    notes = notes_path.read_text() if notes_path.exists() else None
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(out.with_suffix(".md"), result, notes)
    print(
        f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}" + ("" if skipped else f", {png}"),
        flush=True,
    )


def rerender(path: str, out: str | None, notes: str | None) -> int:
    """--from-json: rewrite the reports of an earlier run (new analysis code, or notes added since)."""
    result = json.loads(Path(path).read_text())
    write_reports(result, Path(out) if out else Path(path).with_suffix(""), Path(notes) if notes else None)
    return 0
