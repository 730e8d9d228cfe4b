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
