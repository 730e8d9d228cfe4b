"""op_bench --fixed-shape's batches: how many rows are live, which requests are steered, the live-row list."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the module imports its siblings as a script would
    spec = importlib.util.spec_from_file_location("op_fixed_shape_under_test", BENCH / "op_fixed_shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bank():
    from steer_plugin.engine.bank import build_layer_bank
    from steer_plugin.sae.model import SparseAutoencoder

    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(
        W_enc=torch.randn(8, 64, generator=g),
        W_dec=torch.randn(64, 8, generator=g),
        b_enc=torch.zeros(64),
        b_dec=torch.zeros(8),
        architecture="relu",
    )
    return build_layer_bank(0, [("sae", sae)], [], torch.device("cpu"), torch.float32)


def test_live_rows_are_whole_requests_spread_over_the_batch(bench, bank):
    batch = bench.LiveRows(16, 8, 5, "clamp", 3, 64, bank)  # 8 requests of 2 rows: 3 steered -> 6 rows
    assert batch.live_rows == 6 and list(batch.query_start) == list(range(0, 17, 2))
    steered = [j for j, w in enumerate(batch.wires) if w is not None]
    assert steered == [0, 4, 7]  # first, middle, last
    assert all(len(batch.plans[batch.wires[j]][0].bank_rows) == 3 for j in steered)
    assert bench.LiveRows(4, 8, 0, "add", 1, 64, bank).live_rows == 0
    assert bench.LiveRows(4, 8, 4, "add", 1, 64, bank).live_rows == 4


def test_live_counts_cap_at_the_batch_and_read_all(bench):
    assert bench.live_counts(16, ["0", "1", "4", "64", "all"]) == [0, 1, 4, 16]
    assert bench.live_counts(1, ["0", "1", "4", "all"]) == [0, 1]
