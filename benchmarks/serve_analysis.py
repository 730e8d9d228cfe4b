"""The analysis of benchmarks/serve_bench.py's runs, from the raw units alone: medians over rounds, per-round
ratios against each case's reference case (vanilla for steer-plugin's cases, (l0) = vllm-lens' own plain vLLM for
vllm-lens') and against the same server with nothing steered, the model's FLOPs, the targets' verdicts and what
(h)'s inspect returned. serve_report.py writes them out.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from serve_cases import CASE_BY_KEY, CASES, INSPECT_SLACK


def _stats(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


METRICS = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
# (absent from runs before 2026-12-06)
CPU_METRICS = ("api_cpu_us_per_token", "engine_cpu_us_per_token", "client_cpu_us_per_token")


def _paired(mine: dict, base: dict, metric: str) -> dict | None:
    vals = [
        mine[r][metric] / base[r][metric]
        for r in mine
        if r in base and base[r].get(metric) and mine[r].get(metric) is not None
    ]
    return _stats(vals)


# The unsteered unit on the same server as each steered case: the steering's own cost, apart from loading.
LOADED_REFERENCE = {"g_4layers": "g0_4layers_loaded"}


def summarise(units: list[dict], modes: list[str], concs: list[int], cases: list[str]) -> dict:
    """Per (mode, case, concurrency): medians over rounds, and per-round ratios against vanilla's unit of the
    same round (and against the same server's unsteered unit: b_loaded, or g0 for g). A case whose reference is
    not vanilla (Case.reference: vllm-lens' cases, against its own plain vLLM (l0)) also gets `reference` and
    `ratio_vs_reference`, its ratios against that case's unit of the same round (see vs_reference)."""
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
                metrics = METRICS + tuple(
                    m for m in CPU_METRICS if any(u.get(m) is not None for u in mine.values())
                )
                entry = {m: _stats([u.get(m) for u in mine.values()]) for m in metrics}
                entry["ratio_vs_vanilla"] = {m: _paired(mine, base, m) for m in metrics}
                reference = CASE_BY_KEY[case].reference
                if reference != "a_vanilla":
                    entry["reference"] = reference
                    entry["ratio_vs_reference"] = {m: _paired(mine, by_round(reference), m) for m in METRICS}
                ref = None if CASE_BY_KEY[case].side_venv else LOADED_REFERENCE.get(case, "b_loaded")
                entry["ratio_vs_loaded"] = (
                    {m: _paired(mine, by_round(ref), m) for m in metrics}
                    if ref and case not in ("a_vanilla", ref) and CASE_BY_KEY[case].server != "vanilla"
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


def vs_reference(entry: dict) -> dict:
    """A summary entry's ratios against its case's reference (vanilla unless the entry names another)."""
    return entry["ratio_vs_reference"] if "reference" in entry else entry["ratio_vs_vanilla"]


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
