"""Smoke runs of the benchmark harnesses: they complete and write parseable reports. Never a speed threshold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..tools import skip_or_fail

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_op_bench_smoke(tmp_path):
    out = tmp_path / "op-smoke"
    _run([str(BENCH / "op_bench.py"), "--smoke", "--out", str(out)], timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["d_model"] == 256 and data["settings"]["d_sae"] == 1024
    assert data["rows"], "no steered points measured"
    for row in data["rows"]:
        assert row["op_us"] > 0 and row["layer_us"] > 0
        assert row["prepare_steady_us"] > 0 and row["prepare_all_new_us"] > 0
        # the working set holds each config's distinct features: configs x ops per config
        assert row["working_set"] == min(row["tokens"], row["configs"]) * row["ops_per_token"]
    md = out.with_suffix(".md").read_text()
    rows = _table_rows(md)
    # one row per token count, one per steered point (plus the two header rows)
    assert len(rows) == len(data["per_tokens"]) + len(data["rows"]) + 2


def test_probe_bench_smoke(tmp_path):
    out = tmp_path / "probe-smoke"
    _run([str(BENCH / "probe_bench.py"), "--smoke", "--out", str(out)], timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["probes"] == 16 and [r["tokens"] for r in data["rows"]] == [1, 8]
    for row in data["rows"]:
        assert row["capture_us"] > 0 and row["score_us"] > 0 and row["layer_us"] > 0 and row["step_us"] > 0
        assert row["messages_queued"] > 0  # the records were encoded and sent, not just built
    assert len(_table_rows(out.with_suffix(".md").read_text())) == 1 + len(data["rows"])


def test_op_bench_fixed_shape_smoke(tmp_path):
    out = tmp_path / "fixed-smoke"
    _run([str(BENCH / "op_bench.py"), "--fixed-shape", "--smoke", "--out", str(out)], timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["max_num_seqs"] == 16 and data["settings"]["lane_buckets"][-1] == 32
    rows = data["rows"]
    assert rows and all(r["fixed_matches_eager"] for r in rows)
    for r in rows:
        assert r["eager_us"] > 0 and r["fixed_us"] > 0 and r["layer_us"] > 0
    # 0 and all live rows at every T, for both ops; the former path at 0, 1 and all live rows
    for T in data["settings"]["tokens"]:
        lives = {r["live_rows"] for r in rows if r["tokens"] == T}
        assert {0, T} <= lives
    for T in data["settings"]["tokens"]:
        for op in {r["op"] for r in rows}:
            group = [r for r in rows if r["tokens"] == T and r["op"] == op]
            measured = [r["former_us"] is not None for r in group]
            assert measured == [i in (0, 1, len(group) - 1) for i in range(len(group))]
    md = out.with_suffix(".md").read_text()
    assert len(_table_rows(md)) == len(data["per_tokens"]) + len(rows) + 2


def _demo_assets_ready() -> bool:
    """Built and up to date, so that ensure_assets() returns at once (a build takes many minutes)."""
    try:
        from steer_demo import build_assets
    except ImportError:
        return False
    paths = build_assets.asset_paths()
    if not ((paths.model_dir / "config.json").is_file() and (paths.sae_dir / "cfg.json").is_file()):
        return False
    stages = getattr(build_assets, "_stages", None)
    if stages is None:
        return True
    try:
        return all(stage.is_done() for stage in stages(paths.model_dir.parent).values())
    except Exception:  # noqa: BLE001 - a changed build API: fall back to the files being there
        return True


def _lens_venv_ready() -> bool:
    sys.path.insert(0, str(BENCH))
    try:
        import vllm_lens_side

        return vllm_lens_side.venv_ready(str(vllm_lens_side.DEFAULT_VENV))
    finally:
        sys.path.remove(str(BENCH))


def test_serve_bench_smoke(tmp_path):
    if not _demo_assets_ready():
        skip_or_fail(
            "demo assets not built (python -m steer_demo.build_assets); the smoke run would build them"
        )
    out = tmp_path / "serve-smoke"
    # Two servers (plain vLLM and the plugin), not every case's five: the harness is the same for all of them,
    # and every case's request bodies are planned against its server's config without a server
    # (tests/benchmarks/test_harness.py). vllm-lens' cases join where its side venv is ready.
    asked = ["b_loaded", "c_add1", "h_inspect"]
    if _lens_venv_ready():
        asked += ["l0_lens_plain", "l1_lens_loaded", "l_lens_vector"]
    proc = _run(
        [str(BENCH / "serve_bench.py"), "--smoke", "--cases", ",".join(asked), "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        timeout=600,
    )  # fmt: skip
    data = json.loads(out.with_suffix(".json").read_text())
    cases = data["options"]["cases"]
    assert set(cases) == {"a_vanilla", *asked}  # with the reference every ratio is taken against
    assert data["options"]["modes"] == ["eager"]
    assert data["machine"]["cpu_model"] and data["machine"]["vllm"]
    units = data["units"]
    assert {u["case"] for u in units} == set(cases)
    assert all(u["errors"] == 0 for u in units if u["case"] != "h_inspect"), [u["first_error"] for u in units]
    assert all(
        u["output_tokens"] == u["requests"] * data["options"]["max_tokens"] for u in units if not u["errors"]
    )
    for conc in data["options"]["concurrencies"]:
        assert set(data["summary"]["eager"][str(conc)]) == set(cases)
    md = out.with_suffix(".md").read_text()
    ratio_section = md.split("## Ratios against vanilla: eager", 1)[1].split("###", 1)[0]
    titles = [row.split("|")[1].strip() for row in _table_rows(ratio_section)[1:]]  # skip the header row
    assert titles == [
        data["cases"][c]["title"] for c in cases if data["cases"][c]["reference"] == "a_vanilla"
    ]
    lens = [
        c for c in cases if data["cases"][c]["reference"] != "a_vanilla"
    ]  # vllm-lens' cases, if its venv is ready
    if lens:
        own = md.split("### Ratios against their own plain vLLM", 1)[1].split("###", 1)[0]
        assert [row.split("|")[1].strip().split(" (ref ")[0] for row in _table_rows(own)[1:]] == [
            data["cases"][c]["title"] for c in lens
        ]
        assert data["lens"]["steering_check"]["vector_applied"], data["lens"]["steering_check"]
    # CPU per generated token of the server that served each unit (its whole process group) and of the client
    # (os.times and /proc count in 10 ms ticks: a smoke unit's client may read 0)
    served = [u for u in units if u["output_tokens"]]
    assert all(u["engine_cpu_us_per_token"] > 0 and u["api_cpu_us_per_token"] >= 0 for u in served), [
        (u["case"], u["api_cpu_us_per_token"], u["engine_cpu_us_per_token"]) for u in units
    ]
    cpu = md.split("### CPU per generated token: eager", 1)[1].split("##", 1)[0]
    assert {row.split("|")[1].strip() for row in _table_rows(cpu)[1:]} == set(cases)
    assert "[eager] round 1/1" in proc.stdout  # progress per case
    # vLLM's own default for the cores its CPU worker leaves to the API process (as steer-serve), though the
    # test's environment exports 0 (scripts/test.sh): vLLM logs the number it used
    assert data["options"]["reserved_cpus"] is None and "VLLM_CPU_NUM_OF_RESERVED_CPU unset" in md
    logs = sorted((tmp_path / "work" / "logs").iterdir())
    assert logs and all("reserve_cpu_num=1" in log.read_text() for log in logs), logs
    if data["plot"]:
        assert (out.parent / data["plot"]).is_file()  # recorded relative to the report
    else:
        assert data["plot_skipped"]


def test_fidelity_curve_smoke(tmp_path):
    """A tiny sweep of the concept feature's fidelity curve. Independently of how the script aggregates: an
    `add` of 0 changes nothing (its answers are the unsteered answers, word for word), clamping the concept
    feature hard raises the steered model's probability of the concept's tokens above the unsteered model's on
    every prompt, and the HF reference that computes that probability reproduces vLLM's steered greedy tokens."""
    if not _demo_assets_ready():
        skip_or_fail(
            "demo assets not built (python -m steer_demo.build_assets); the smoke run would build them"
        )
    from steer_demo.labels import CONCEPTS

    out = tmp_path / "fidelity"
    proc = _run(
        [str(BENCH / "fidelity_curve.py"), "--values", "0,2.5", "--prompts", "2", "--max-tokens", "12"]
        + ["--out-dir", str(out)],
        timeout=900,
    )
    data = json.loads((out / "fidelity-curve.json").read_text())
    cases = {("plain", 0.0), ("add", 0.0), ("add", 2.5), ("clamp", 0.0), ("clamp", 2.5)}
    assert {(r["op"], r["multiple"]) for r in data["rows"]} == cases
    answers = {(a["op"], a["multiple"], a["prompt"]): a for a in data["answers"]}
    assert set(answers) == {(*case, p) for case in cases for p in (0, 1)}
    for p in (0, 1):
        plain, add0, clamp = (answers[op, m, p] for op, m in (("plain", 0.0), ("add", 0.0), ("clamp", 2.5)))
        assert add0["text"] == plain["text"]
        assert clamp["concept_prob"] > plain["concept_prob"], (clamp, plain)
    clamp_row = next(r for r in data["rows"] if r["op"] == "clamp" and r["multiple"] == 2.5)
    assert clamp_row["value"] == pytest.approx(2.5 * data["feature"]["max_act"], abs=1e-3)
    assert min(a["agreement"] for a in data["answers"]) >= 0.75, data["answers"]
    words = CONCEPTS["bridge"]["word_tokens"]
    assert data["settings"]["concept_tokens"]
    assert all(t.strip().lower() in words for t in data["settings"]["concept_tokens"])
    md = (out / "fidelity-curve.md").read_text()
    table = md.split("| op | value", 1)[1].split("\n\n", 1)[0]
    assert len(_table_rows("| op | value" + table)) == 1 + len(cases)  # header + one row per case
    if data["plot"]:
        assert (out / data["plot"]).is_file()
    assert "[fidelity" in proc.stderr  # progress lines
