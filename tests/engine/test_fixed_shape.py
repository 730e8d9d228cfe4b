"""The fixed-shape op (the form a CUDA graph captures) against the written-out definitions: lanes of the steered
rows at every bucket boundary, padding lanes, nothing live, conditions, position rules, normalising SAEs, observed
rows only; every other row bit for bit. At "capture" (a stand-in for torch's CUDAGraph: no GPU here) every
bucket branch is recorded under one outer gate, whatever the step's flags hold; without conditional nodes the op
records its ungated form. Off a capture the flags' host copies pick the branch (what op_bench measures)."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.catalog import LoadedAssets, LoadedSAE, LoadedVector
from steer_plugin.config import SteerConfig, parse_config
from steer_plugin.engine import fixed, gate
from steer_plugin.engine import op as steer_op
from steer_plugin.engine.bank import build_layer_bank
from steer_plugin.engine.lanes import Lanes, bucket_sizes
from steer_plugin.engine.selftest import SelfTestError
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.engine.step import StepMetadata
from steer_plugin.engine.tables import OP_NAMES, LayerPlan, LayerTables
from steer_plugin.request.resolve import resolve_spec
from steer_plugin.request.schema import parse_spec
from steer_plugin.request.wire import ObservePlan, RequestPlan

from .definitions import written_out
from .test_delta import POS, PROMPT_LEN, SAE_CASES, mixed_request, random_sae

D, D_SAE, LAYER, MAX_TOKENS, MAX_SEQS = 16, 48, 2, 64, 24
# SAE id -> (architecture, normalize_activations, center_writing_weights)
SAES = {
    "s": ("standard", "none", False),
    "n": ("jumprelu", "layer_norm", False),
    "c": ("standard", "constant_norm_rescale", True),
}


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saes")
    g = torch.Generator().manual_seed(0)
    for sid, (arch, norm, center) in SAES.items():
        sub = folder / sid
        sub.mkdir()
        cfg = {
            "d_in": D,
            "d_sae": D_SAE,
            "dtype": "float32",
            "device": "cpu",
            "architecture": arch,
            "apply_b_dec_to_input": arch == "jumprelu",
            "normalize_activations": norm,
            "center_writing_weights": center,
            "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post", "sae_lens_version": "6.5.0"},
        }
        (sub / "cfg.json").write_text(json.dumps(cfg))
        tensors = {
            "W_enc": torch.randn(D, D_SAE, generator=g) * 0.3,
            "W_dec": torch.randn(D_SAE, D, generator=g) * 0.3,
            "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "b_dec": torch.randn(D, generator=g) * 0.1,
        }
        if arch == "jumprelu":
            tensors["threshold"] = torch.rand(D_SAE, generator=g) * 0.2
        save_file(tensors, str(sub / "sae_weights.safetensors"))
    save_file({"v": torch.randn(D, generator=g)}, str(folder / "vec.safetensors"))
    return folder


@pytest.fixture
def steerer(sae_dir, tmp_path, monkeypatch):
    config = parse_config(
        {
            "saes": [{"id": sid, "path": str(sae_dir / sid)} for sid in SAES],
            "vectors": [{"id": "v", "path": str(sae_dir / "vec.safetensors"), "layer": LAYER}],
            "policy": {"allow_inline_vectors": True, "max_inline_vectors": 1},
        }
    )
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    yield st
    steer_op.LAYERS.clear()


class FakeGraph:
    """Stands in for the torch.cuda.CUDAGraph being captured: records its conditional nodes as a tree of
    (predicate, children)."""

    def __init__(self, fail: bool = False):
        self.root: list = []
        self._stack = [self.root]
        self.fail = fail
        self.begins = 0

    def begin_capture_to_if_node(self, pred: torch.Tensor) -> None:
        self.begins += 1
        if self.fail:
            raise RuntimeError("CUDA Graphs conditional nodes are not supported for cuda version < 12.4")
        assert pred.dtype == torch.bool and pred.dim() == 0
        node = (pred, [])
        self._stack[-1].append(node)
        self._stack.append(node[1])

    def end_capture_to_conditional_node(self) -> None:
        self._stack.pop()


def run_op(hidden, residual, capturing: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(steer_op, "_capturing", lambda: capturing)
    return torch.ops.steer_plugin.steer_residual(hidden, residual, LAYER)


def encode_wire(ops, observe=None) -> str:
    return RequestPlan.build(ops, observe=observe).encode()


def random_condition(rng: random.Random) -> dict | None:
    if rng.random() < 0.6:
        return None
    return {"sae": rng.choice(list(SAES)), "index": rng.randrange(D_SAE), rng.choice(["above", "below"]): 0.2}


def random_steering(rng: random.Random) -> dict:
    features = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["add", "clamp", "scale", "ablate"])
        feature = {"sae": rng.choice(list(SAES)), "index": rng.randrange(D_SAE), "op": kind}
        if kind != "ablate":
            feature["value"] = rng.uniform(-3, 3)
        if kind == "add" and rng.random() < 0.3:
            feature["normalize"] = True
        feature["positions"] = rng.choice(["all", "prompt", "generation", {"last_prompt_tokens": 2}])
        feature["when"] = random_condition(rng)
        features.append(feature)
    vectors = []
    if rng.random() < 0.5:
        vectors.append({"name": "v", "scale": rng.uniform(-2, 2), "when": random_condition(rng)})
    return {"features": features, "vectors": vectors}


def batch_with_steered_rows(steerer: Steerer, rng: random.Random, steered_rows: int, step: int):
    """(BatchView, forward rows T, each request's `steering` or None): exactly `steered_rows` token rows belong to
    steered requests, mixed with unsteered (some observed) requests and followed by padding rows."""
    catalog = steerer.assets.catalog()
    sizes, steerings = [], []
    left = steered_rows
    while left:
        size = min(rng.randint(max(1, math.ceil(steered_rows / 12)), 8), left)
        sizes.append(size)
        steerings.append(random_steering(rng))
        left -= size
    while len(sizes) < MAX_SEQS and sum(sizes) < MAX_TOKENS and rng.random() < 0.7:
        sizes.append(min(rng.randint(1, 4), MAX_TOKENS - sum(sizes)))
        steerings.append(None)
    order = list(range(len(sizes)))
    rng.shuffle(order)
    sizes, steerings = [sizes[i] for i in order], [steerings[i] for i in order]
    computed, prompts, wires = [], [], []
    for i, size in enumerate(sizes):
        if size == 1 and rng.random() < 0.7:  # decode
            prompt = rng.randint(2, 6)
            computed.append(prompt + rng.randint(-1, 4))
        else:  # a prefill chunk; the prompt may go on past it
            computed.append(rng.randint(0, 3))
            prompt = computed[-1] + size + rng.randint(0, 2)
        prompts.append(prompt)
        ops = resolve_spec(parse_spec(steerings[i]), catalog) if steerings[i] else []
        observe = None
        if rng.random() < 0.4:
            cid = f"{step:08x}{i:024x}"
            observe = ObservePlan(cid, (rng.choice(list(SAES)),), 3, rng.random() < 0.5)  # (sent nowhere)
        wires.append(encode_wire(ops, observe) if ops or observe else None)
    query_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    view = BatchView(
        [f"r{step}-{i}" for i in range(len(sizes))],
        query_start,
        np.array(computed, dtype=np.int64),
        np.array(prompts, dtype=np.int64),
        wires,
    )
    padded = min(MAX_TOKENS, int(query_start[-1]) + rng.randint(0, 3))
    return view, padded, steerings


def formula_rows(steerer: Steerer, view: BatchView, steerings, x: torch.Tensor) -> torch.Tensor:
    """Every real row's change [rows, d] from its request's `steering`, per the written-out definitions."""
    saes = {sid: steerer.observer.saes[sid] for sid in SAES}
    vectors = {"v": steerer.assets.vectors["v"].vector}
    out = torch.zeros(int(view.query_start[-1]), D, dtype=torch.float64)
    for i, steering in enumerate(steerings):
        lo, hi = int(view.query_start[i]), int(view.query_start[i + 1])
        if steering:
            pos = range(int(view.num_computed[i]), int(view.num_computed[i]) + hi - lo)
            out[lo:hi] = written_out(steering, saes, vectors, x[lo:hi], pos, int(view.num_prompt[i]))
    return out


BOUNDARIES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64]


def test_every_bucket_boundary_matches_the_formula_and_leaves_other_rows_bit_for_bit(steerer, monkeypatch):
    """n steered rows run the bucket just above n (padding lanes repeat the last row: the same values, not
    counted), against the written-out formula and the eager op; unsteered and padding rows are the input bit
    for bit; only the observed rows of the capture buffer are written."""
    rng = random.Random(0)
    rt = steer_op.LAYERS[LAYER]
    sizes_run: list[int] = []
    real_steer_lanes = fixed.steer_lanes

    def spy(rt_, hidden, residual, out, rows, gate_, padded=True):
        sizes_run.append(rows.shape[0])
        return real_steer_lanes(rt_, hidden, residual, out, rows, gate_, padded)

    monkeypatch.setattr(fixed, "steer_lanes", spy)
    for step, n in enumerate(BOUNDARIES):
        view, padded, steerings = batch_with_steered_rows(steerer, rng, n, step)
        steerer.prepare(view)
        assert steerer.step.steered_rows_host.size == n
        g = torch.Generator().manual_seed(step)
        hidden, residual = torch.randn(padded, D, generator=g), torch.randn(padded, D, generator=g)
        counts = steerer.tables[LAYER].op_counts.clone()
        eager = run_op(hidden, residual, False, monkeypatch)
        eager_counts = steerer.tables[LAYER].op_counts - counts
        rt.capture.fill_(float("nan"))
        sizes_run.clear()
        counts = steerer.tables[LAYER].op_counts.clone()
        out = run_op(hidden, residual, True, monkeypatch)
        assert sizes_run == ([min(s for s in bucket_sizes(MAX_TOKENS) if s >= n)] if n else [])
        assert torch.equal(
            steerer.tables[LAYER].op_counts - counts, eager_counts
        )  # padding lanes: not counted
        real = int(view.query_start[-1])
        want = residual[:real] + formula_rows(steerer, view, steerings, hidden + residual).float()
        torch.testing.assert_close(out[:real], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        steered = set(steerer.step.steered_rows_host.tolist())
        for row in range(padded):
            if row not in steered:
                assert torch.equal(out[row], residual[row]), row
        observed = rt.capture_rows.tolist() if rt.capture_rows is not None else []
        for row in range(MAX_TOKENS):
            if row in observed:
                torch.testing.assert_close(rt.capture[row], hidden[row] + out[row])
            else:
                assert rt.capture[row].isnan().all(), row  # not written
        steerer.after_forward()


def test_nothing_live_runs_no_branch(steerer, monkeypatch, mailroom):
    """No steered row: no lane branch runs and the output is the input bit for bit; observed rows alone still
    run the observation branch."""
    calls = {"steer": 0, "observe": 0}
    real_steer, real_copy = fixed.steer_lanes, fixed.copy_observed
    monkeypatch.setattr(
        fixed,
        "steer_lanes",
        lambda *a, **k: calls.__setitem__("steer", calls["steer"] + 1) or real_steer(*a, **k),
    )
    monkeypatch.setattr(
        fixed,
        "copy_observed",
        lambda *a, **k: calls.__setitem__("observe", calls["observe"] + 1) or real_copy(*a, **k),
    )
    cid = "a" * 32
    view = BatchView(
        ["a", "b"],
        np.array([0, 3, 4]),
        np.array([0, 5]),
        np.array([3, 4]),
        [None, encode_wire([], mailroom.plan(cid, ("s",), 2, False))],
    )
    steerer.prepare(view)
    hidden, residual = torch.randn(6, D), torch.randn(6, D)
    out = run_op(hidden, residual, True, monkeypatch)
    assert torch.equal(out, residual) and calls == {"steer": 0, "observe": 1}
    torch.testing.assert_close(steer_op.LAYERS[LAYER].capture[3], hidden[3] + residual[3])
    steerer.after_forward()
    out = run_op(hidden, residual, True, monkeypatch)  # disarmed: nothing at all
    assert torch.equal(out, residual) and calls == {"steer": 0, "observe": 1}


def test_a_forward_smaller_than_the_prepared_batch_is_left_unsteered(steerer, monkeypatch):
    """A forward that skipped preparation after a bigger batch (10 rows prepared, rows 0 and 9 steered; 6 in
    the forward): the lane bucket (2) is one a forward of 6 rows records, but lane row 9 is past its end, so
    the outer gate (fits) stays closed, as the eager op refuses such a step."""
    catalog = steerer.assets.catalog()
    wire = encode_wire(
        resolve_spec(parse_spec({"features": [{"sae": "s", "index": 5, "value": 2.5}]}), catalog)
    )
    view = BatchView(
        ["a", "b", "c"], np.array([0, 1, 9, 10]), np.array([4, 0, 4]), np.array([3, 8, 3]), [wire, None, wire]
    )
    steerer.prepare(view)
    assert steerer.step.steered_rows_host.tolist() == [0, 9]
    hidden, residual = torch.randn(6, D), torch.randn(6, D)
    for capturing in (False, True):
        assert torch.equal(run_op(hidden, residual, capturing, monkeypatch), residual)
    hidden, residual = torch.randn(10, D), torch.randn(10, D)  # the prepared batch itself is steered
    assert not torch.equal(run_op(hidden, residual, True, monkeypatch)[9], residual[9])


def test_lanes_pad_with_the_last_row_and_set_fits_and_one_bucket():
    lanes = Lanes(100, torch.device("cpu"))
    assert lanes.sizes == (1, 2, 4, 8, 16, 32, 64, 100)
    lanes.write(np.array([3, 7, 20, 21, 40]), needed=45)
    assert lanes.rows[:8].tolist() == [3, 7, 20, 21, 40, 40, 40, 40] and lanes.live().tolist() == [
        3,
        7,
        20,
        21,
        40,
    ]
    assert [bool(lanes.fits(t).host[0]) for t in (0, 44, 45, 99, 100, 500)] == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]
    assert [bool(lanes.bucket(i).host[0]) for i in range(len(lanes.sizes))] == [i == 3 for i in range(8)]
    lanes.write(np.arange(70), needed=70)
    assert [bool(lanes.bucket(i).host[0]) for i in range(8)] == [i == 7 for i in range(8)]
    assert lanes.rows[69:100].tolist() == [69] * 31
    lanes.clear()
    assert not lanes.flags.any() and lanes.count == 0
    # Every lane count a forward of T rows can have has its bucket among those a capture at T records.
    for max_tokens in (64, 100, 1):
        lanes = Lanes(max_tokens, torch.device("cpu"))
        for t in range(1, max_tokens + 1):
            recorded = {size for _, size in lanes.buckets_upto(t)}
            for n in range(1, t + 1):
                assert min(s for s in lanes.sizes if s >= n) in recorded


def _tree(nodes) -> list:
    return [(pred.data_ptr(), _tree(children)) for pred, children in nodes]


def test_a_capture_records_every_bucket_branch_under_one_outer_gate(steerer, monkeypatch):
    """While capturing, every bucket branch a forward of T rows can need is recorded (no host decision: here
    the step has nothing live), each under its bucket flag, all under one outer flag; inside each branch
    every term of the formula under its table flag; the observed rows the same way."""
    graph = FakeGraph()
    monkeypatch.setattr(gate, "capturing_graph", lambda: graph)
    monkeypatch.setattr(gate._Support, "usable", True)
    steerer.disarm()
    for T in (1, 20, 64):
        graph.root.clear()
        residual = torch.randn(T, D)
        out = run_op(torch.randn(T, D), residual, True, monkeypatch)
        assert out.shape == residual.shape
        lanes, observed, flags = (
            steerer.step.lanes,
            steer_op.LAYERS[LAYER].observed,
            steerer.tables[LAYER].flags,
        )
        buckets = [i for i, size in enumerate(lanes.sizes) if size < T] + [lanes.sizes.index(
            min(s for s in lanes.sizes if s >= T))]  # fmt: skip
        terms = [
            (flags.positions.device.data_ptr(), []),
            (flags.x.device.data_ptr(), []),
            (flags.norm.device.data_ptr(), []),
            (flags.read.device.data_ptr(), []),
            (flags.cond.device.data_ptr(), [(flags.norm.device.data_ptr(), [])]),
            (flags.bn.device.data_ptr(), []),
        ]
        assert _tree(graph.root) == [
            (lanes.fits(T).device.data_ptr(), [(lanes.bucket(i).device.data_ptr(), terms) for i in buckets]),
            (
                observed.fits(T).device.data_ptr(),
                [(observed.bucket(i).device.data_ptr(), []) for i in buckets],
            ),
        ]


def test_without_conditional_nodes_the_capture_is_ungated_over_every_row(steerer, monkeypatch, caplog):
    """A capture whose graph refuses conditional nodes (CUDA < 12.4, ROCm): logged once, the op records one
    ungated computation over every row (each row its own slot's plan); the numbers are the formula's."""
    graph = FakeGraph(fail=True)
    monkeypatch.setattr(gate, "capturing_graph", lambda: graph)
    monkeypatch.setattr(gate._Support, "usable", True)
    monkeypatch.setattr(gate._Support, "logged", False)
    rng = random.Random(5)
    rt = steer_op.LAYERS[LAYER]
    with caplog.at_level(logging.WARNING, logger="steer_plugin"):
        for step, n in enumerate((5, 12)):
            view, padded, steerings = batch_with_steered_rows(steerer, rng, n, step)
            steerer.prepare(view)
            g = torch.Generator().manual_seed(step)
            hidden, residual = torch.randn(padded, D, generator=g), torch.randn(padded, D, generator=g)
            out = run_op(hidden, residual, True, monkeypatch)
            real = int(view.query_start[-1])
            want = residual[:real] + formula_rows(steerer, view, steerings, hidden + residual).float()
            torch.testing.assert_close(out[:real], want, rtol=1e-4, atol=1e-4)
            assert torch.equal(out[real:], residual[real:])
            torch.testing.assert_close(rt.capture[:padded], hidden + out)  # every row: no stale row index
            steerer.after_forward()
    assert graph.begins == 1 and gate._Support.usable is False  # tried once, then never again
    assert len([r for r in caplog.records if "conditional nodes unavailable" in r.message]) == 1


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "fixed-shape"])
def test_self_test_probe_works_in_both_paths(steerer, monkeypatch, capturing):
    residual = torch.randn(1, D)
    steerer.self_test(lambda: run_op(torch.zeros(1, D), residual, capturing, monkeypatch))
    if capturing:  # the probe comes from the lane branch: without it the self-test must refuse to start
        monkeypatch.setattr(fixed, "steer_lanes", lambda *a, **k: None)
        with pytest.raises(SelfTestError):
            steerer.self_test(lambda: run_op(torch.zeros(1, D), residual, capturing, monkeypatch))


@pytest.mark.parametrize("case", list(SAE_CASES))
def test_fixed_shape_matches_the_definitions_for_every_sae_kind(case, monkeypatch):
    """test_delta's mixed request (every op kind, position rule and both `when` directions) through the
    fixed-shape op's lanes on every SAE architecture and normalisation, against the written-out definitions."""
    sae = random_sae(**SAE_CASES[case])
    vec = torch.randn(sae.d_in, generator=torch.Generator().manual_seed(9))
    x = torch.randn(len(POS), sae.d_in, generator=torch.Generator().manual_seed(1)) * 3
    request = mixed_request(sae, x)
    want = written_out(request, {"s": sae}, {"v": vec}, x, POS, PROMPT_LEN).float()
    assets = LoadedAssets(
        {"s": LoadedSAE("s", sae, LAYER, {}, None)}, {"v": LoadedVector("v", vec, LAYER)}, SteerConfig()
    )
    ops = resolve_spec(parse_spec(request), assets.catalog())
    cpu = torch.device("cpu")
    bank = build_layer_bank(LAYER, [("s", sae)], [("v", vec)], cpu, torch.float32)
    plan = LayerPlan(
        bank_rows=np.array([bank.row(o.kind, o.source, o.index) for o in ops]),
        coef=np.array([[o.coef.a, o.coef.b, o.coef.bn] for o in ops], dtype=np.float32),
        positions=np.array([o.positions.code for o in ops], dtype=np.int8),
        last_n=np.array([o.positions.last_n for o in ops]),
        op_codes=np.array([OP_NAMES.index(o.op) for o in ops], dtype=np.int8),
        cond_rows=np.array(
            [-1 if o.when is None else bank.row("feature", o.when.sae, o.when.index) for o in ops]
        ),
        cond_thr=np.array([0.0 if o.when is None else o.when.threshold for o in ops], dtype=np.float32),
        cond_sign=np.array([0 if o.when is None else o.when.sign for o in ops], dtype=np.int8),
    )
    step = StepMetadata(16, 4, cpu)
    tables = LayerTables(bank, 4, 8, bank.num_rows, cpu)
    # The two requests of POS / PROMPT_LEN (rows 0-5 and 6-7), both with the request; one unsteered row after.
    slots = step.acquire_many(["a", "b"], [4, 10])
    tables.write_slots(slots, [plan, plan])
    step.write(np.array([slots[0], slots[1], step.null_slot]), np.array([0, 6, 8, 9]), np.array([0, 9, 0]))
    steer_op.LAYERS.clear()
    steer_op.LAYERS[LAYER] = steer_op.LayerRuntime(tables, step, observable=False)
    try:
        residual = torch.randn(9, sae.d_in, generator=torch.Generator().manual_seed(2))
        hidden = torch.cat([x, torch.zeros(1, sae.d_in)]) - residual
        for capturing in (True, False):
            out = run_op(hidden, residual, capturing, monkeypatch)
            torch.testing.assert_close(out[:8] - residual[:8], want, rtol=1e-4, atol=1e-4)
            assert torch.equal(out[8], residual[8])
    finally:
        steer_op.LAYERS.clear()
