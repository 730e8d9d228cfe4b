"""op_bench's memory floor: the least bytes a step of the op moves, at the layer's own byte rate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "op_bench.py"


@pytest.fixture(scope="module")
def op_bench():
    sys.path.insert(0, str(BENCH.parent))  # op_bench imports its sibling `machine` as a script would
    spec = importlib.util.spec_from_file_location("op_bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = {"d_model": 4096, "dtype": "bfloat16", "layer_params": 218_103_808}


def test_memory_floor_counts_rows_once_and_tokens_per_row(op_bench):
    rate = 2.0  # bytes per µs
    clamp = {"op": "clamp", "working_set": 2048, "tokens": 512}
    # encoder + decoder row of each of 2048 features (bf16), then 512 residual rows read, written, and the
    # layer output read.
    want = (2048 * 4096 * 2 * 2 + 512 * 4096 * 2 * 3) / rate
    assert op_bench.memory_floor_us(clamp, SETTINGS, rate) == pytest.approx(want)
    add = {"op": "add", "working_set": 16, "tokens": 1}
    assert op_bench.memory_floor_us(add, SETTINGS, rate) == pytest.approx(
        (16 * 4096 * 2 + 4096 * 2 * 2) / rate
    )


def test_layer_byte_rate_is_weights_over_the_decode_time(op_bench):
    result = {"settings": SETTINGS, "per_tokens": {"1": {"layer": {"median_us": 30_000.0}}}}
    assert op_bench.layer_bytes_per_us(result) == pytest.approx(218_103_808 * 2 / 30_000.0)
    assert op_bench.layer_bytes_per_us({"settings": SETTINGS, "per_tokens": {"16": {}}}) is None


def test_committed_report_shows_the_floor():
    """The committed CPU report was re-rendered with the floor columns (python benchmarks/op_bench.py
    --from-json benchmarks/results/op-cpu.json --out benchmarks/results/op-cpu)."""
    text = (BENCH.parent / "results" / "op-cpu.md").read_text()
    assert "| memory floor / layer | × floor |" in text
