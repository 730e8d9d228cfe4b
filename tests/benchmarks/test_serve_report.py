"""The server benchmark's report re-renders from its JSON alone (`serve_bench.py --from-json`): the committed
results/cpu-smollm2.{md,json} come back byte for byte (they were written by the run itself, before the harness was
split into driver, cases and report). Fast: no server, no model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def test_committed_report_rerenders_byte_identically(tmp_path):
    # Without matplotlib the report says "plot skipped" instead of linking the plot: not the committed bytes.
    pytest.importorskip("matplotlib")
    out = tmp_path / "cpu-smollm2"  # the same name: the report links the plot by file name
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "serve_bench.py"),
        "--from-json",
        str(RESULTS / "cpu-smollm2.json"),
    ]
    cmd += ["--out", str(out), "--notes", str(RESULTS / "cpu-smollm2-notes.md")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for suffix in (".md", ".json"):
        assert out.with_suffix(suffix).read_bytes() == (RESULTS / f"cpu-smollm2{suffix}").read_bytes(), suffix
    assert out.with_suffix(".png").stat().st_size > 0


def _unit(case: str, rnd: int, tok_s: float, itl: float) -> dict:
    return {"mode": "eager", "round": rnd, "case": case, "concurrency": 1, "tok_s": tok_s, "ttft_p50_ms": 10.0,
            "ttft_p99_ms": 12.0, "itl_p50_ms": itl, "itl_p99_ms": 2 * itl, "errors": 0, "disturbed": False,
            "output_tokens": 8, "extra_response_fields": []}  # fmt: skip


def test_ratios_are_per_round_against_each_cases_reference():
    """steer-plugin's (c) against vanilla (a), vllm-lens' (l) against its own plain vLLM (l0), round by round."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve_report

    tok = {  # tok/s per round
        "a_vanilla": [100.0, 90.0, 110.0],
        "c_add1": [95.0, 88.0, 99.0],
        "l0_lens_plain": [80.0, 70.0, 75.0],
        "l_lens_vector": [60.0, 63.0, 75.0],
    }
    itl = {"a_vanilla": [10.0] * 3, "c_add1": [11.0, 10.0, 12.0], "l0_lens_plain": [20.0] * 3,
           "l_lens_vector": [30.0, 22.0, 25.0]}  # fmt: skip
    units = [_unit(c, r, tok[c][r], itl[c][r]) for c in tok for r in range(3)]
    cell = serve_report.summarise(units, ["eager"], [1], list(tok))["eager"]["1"]

    c, lens = cell["c_add1"], cell["l_lens_vector"]
    # (c): per round 95/100, 88/90, 99/110 = 0.95, 0.977, 0.9 -> median 0.95, min 0.9, max 88/90
    assert "reference" not in c and serve_report.vs_reference(c) is c["ratio_vs_vanilla"]
    assert c["ratio_vs_vanilla"]["tok_s"]["median"] == pytest.approx(0.95)
    assert c["ratio_vs_vanilla"]["tok_s"]["min"] == pytest.approx(0.9)
    assert c["ratio_vs_vanilla"]["tok_s"]["max"] == pytest.approx(88 / 90)
    # (l): per round 60/80, 63/70, 75/75 -> 0.75, 0.9, 1.0; against vanilla it would be 0.6, 0.7, 0.6818
    assert lens["reference"] == "l0_lens_plain"
    r = serve_report.vs_reference(lens)
    assert (r["tok_s"]["median"], r["tok_s"]["min"], r["tok_s"]["max"]) == pytest.approx((0.9, 0.75, 1.0))
    assert r["itl_p50_ms"]["median"] == pytest.approx(25 / 20)
    assert lens["ratio_vs_vanilla"]["tok_s"]["median"] == pytest.approx(75 / 110)
    assert lens["ratio_vs_loaded"] is None  # no steer-plugin server under it
    # the reference against itself is 1
    assert serve_report.vs_reference(cell["l0_lens_plain"])["tok_s"]["median"] == pytest.approx(1.0)


def test_cpu_per_token_reads_against_the_unsteered_units_of_the_same_server(tmp_path):
    """Per round, (h)'s API-process CPU per token over (b)'s; the report's CPU table shows it; runs without the
    figures (before they were recorded) get no CPU entries, so their reports re-render unchanged."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve_report

    api = {"a_vanilla": [150.0] * 3, "b_loaded": [160.0, 150.0, 170.0], "h_inspect": [240.0, 225.0, 272.0]}
    units = [
        _unit(case, r, 100.0, 10.0)
        | {"api_cpu_us_per_token": v[r], "engine_cpu_us_per_token": 6300.0, "client_cpu_us_per_token": 80.0}
        for case, v in api.items()
        for r in range(3)
    ]
    cell = serve_report.summarise(units, ["eager"], [1], list(api))["eager"]["1"]
    h = cell["h_inspect"]["ratio_vs_loaded"]["api_cpu_us_per_token"]
    # per round 240/160, 225/150, 272/170 = 1.5, 1.5, 1.6
    assert (h["median"], h["min"], h["max"]) == pytest.approx((1.5, 1.5, 1.6))
    lines = serve_report._cpu_table({"1": cell}, "eager", {"concurrencies": [1]})
    assert "| h_inspect | 1 | 240 | 1.500 [1.500–1.600] | 80 | 6300 |" in lines
    old = serve_report.summarise([_unit("a_vanilla", 0, 100.0, 10.0)], ["eager"], [1], ["a_vanilla"])
    assert "api_cpu_us_per_token" not in old["eager"]["1"]["a_vanilla"]
