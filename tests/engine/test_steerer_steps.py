"""Step after step through a real Steerer and the op: the fixed-shape (CUDA-graph capture) path forced on the
CPU against the eager path, on random batches with padding, shrinking sizes and observation; forwards that
skip preparation; and messages the engine must drop."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steer_plugin import signing
from steer_plugin.config import parse_config
from steer_plugin.engine import op as steer_op
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.request.resolve import resolve_spec
from steer_plugin.request.schema import parse_spec
from steer_plugin.request.wire import ObservePlan, RequestPlan

from .definitions import written_out

D, D_SAE, LAYER, MAX_TOKENS, MAX_SEQS = 16, 48, 2, 64, 8


def encode_wire(ops, observe: ObservePlan | None = None) -> str:
    """The signed message the API process would send for these ops and observation."""
    return RequestPlan.build(ops, observe=observe).encode()


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sae")
    g = torch.Generator().manual_seed(0)
    cfg = {
        "d_in": D,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "architecture": "standard",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post", "sae_lens_version": "6.5.0"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {
        "W_enc": torch.randn(D, D_SAE, generator=g) * 0.3,
        "W_dec": torch.randn(D_SAE, D, generator=g) * 0.3,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "b_dec": torch.randn(D, generator=g) * 0.1,
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    vec = torch.randn(D, generator=g)
    save_file({"v": vec}, str(folder / "vec.safetensors"))
    return folder


@pytest.fixture
def steerer(sae_dir, tmp_path, monkeypatch):
    config = parse_config(
        {
            "saes": [{"id": "s", "path": str(sae_dir)}],
            "vectors": [{"id": "v", "path": str(sae_dir / "vec.safetensors"), "layer": LAYER}],
            "policy": {"allow_inline_vectors": True, "max_inline_vectors": 2},
        }
    )
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    yield st
    steer_op.LAYERS.clear()


def random_condition(rng: random.Random) -> dict | None:
    if rng.random() < 0.5:
        return None
    return {"sae": "s", "index": rng.randrange(D_SAE), rng.choice(["above", "below"]): rng.uniform(0, 0.6)}


def random_steering(rng: random.Random) -> dict:
    features = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["add", "clamp", "scale", "ablate"])
        feature = {"sae": "s", "index": rng.randrange(D_SAE), "op": kind}
        if kind != "ablate":
            feature["value"] = rng.uniform(-3, 3)
        feature["positions"] = rng.choice(["all", "prompt", "generation", {"last_prompt_tokens": 2}])
        feature["when"] = random_condition(rng)
        features.append(feature)
    vectors = (
        [{"name": "v", "scale": rng.uniform(-2, 2), "when": random_condition(rng)}]
        if rng.random() < 0.5
        else []
    )
    if rng.random() < 0.4:  # an inline vector: a scratch row of the bank for as long as the request runs
        values = [rng.uniform(-1, 1) for _ in range(D)]
        vectors.append(
            {"values": values, "layer": LAYER, "scale": rng.uniform(-2, 2), "when": random_condition(rng)}
        )
    return {"features": features, "vectors": vectors}


def random_batch(steerer: Steerer, rng: random.Random, num_reqs: int, step: int):
    """(BatchView, padded token count, each request's `steering` or None) of a mixed prefill/decode batch."""
    catalog = steerer.assets.catalog()
    sizes, computed, prompts, wires, cids, steerings = [], [], [], [], [], []
    for i in range(num_reqs):
        prompt = rng.randint(2, 9)
        decode = rng.random() < 0.6
        sizes.append(1 if decode else prompt)
        computed.append(prompt + rng.randint(0, 5) if decode else 0)
        prompts.append(prompt)
        steerings.append(random_steering(rng) if rng.random() < 0.7 else None)
        ops = resolve_spec(parse_spec(steerings[-1]), catalog) if steerings[-1] else []
        observe = None
        if rng.random() < 0.5:
            cid = f"{step:08x}{i:024x}"
            cids.append(cid)
            observe = ObservePlan(cid, ("s",), 3, rng.random() < 0.5)  # (records sent nowhere)
        wires.append(encode_wire(ops, observe) if ops or observe else None)
    query_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    view = BatchView(
        req_ids=[f"r{step}-{i}" for i in range(num_reqs)],
        query_start=query_start,
        num_computed=np.array(computed, dtype=np.int64),
        num_prompt=np.array(prompts, dtype=np.int64),
        wires=wires,
    )
    padded = min(MAX_TOKENS, int(query_start[-1]) + rng.randint(0, 4))  # graph padding rows
    return view, padded, steerings


def written_out_rows(steerer: Steerer, view: BatchView, steerings, x: torch.Tensor) -> torch.Tensor:
    """Every real token row's change [rows, d] from its request's `steering`, per the definitions."""
    saes, vectors = {"s": steerer.observer.saes["s"]}, {"v": steerer.assets.vectors["v"].vector}
    out = torch.zeros(int(view.query_start[-1]), D, dtype=torch.float64)
    for i, steering in enumerate(steerings):
        lo, hi = int(view.query_start[i]), int(view.query_start[i + 1])
        if steering:
            pos = range(int(view.num_computed[i]), int(view.num_computed[i]) + hi - lo)
            out[lo:hi] = written_out(steering, saes, vectors, x[lo:hi], pos, int(view.num_prompt[i]))
    return out


def run_op(hidden, residual, capturing: bool, monkeypatch):
    monkeypatch.setattr(steer_op, "_capturing", lambda: capturing)
    out = torch.ops.steer_plugin.steer_residual(hidden, residual, LAYER)
    rt = steer_op.LAYERS[LAYER]
    return out, rt.capture.clone()


@pytest.mark.parametrize("block_columns", [1024, 3], ids=["one-gemm", "row-blocks"])
def test_capture_path_matches_eager_on_random_shrinking_batches(steerer, monkeypatch, block_columns):
    """block_columns=3: the eager op multiplies per block of requests over their own columns (what it does for
    big working sets) and must give the same rows as the fixed-shape path (per lane, each entry's own rows)."""
    monkeypatch.setattr(steer_op, "BLOCK_COLUMNS", block_columns)
    rng = random.Random(0)
    rt = steer_op.LAYERS[LAYER]
    for step, num_reqs in enumerate([8, 6, 7, 3, 5, 1, 2, 1]):
        view, padded, steerings = random_batch(steerer, rng, num_reqs, step)
        steerer.prepare(view)
        real = int(view.query_start[-1])
        g = torch.Generator().manual_seed(step)
        hidden, residual = torch.randn(padded, D, generator=g), torch.randn(padded, D, generator=g)
        eager, eager_capture = run_op(hidden, residual, False, monkeypatch)
        dense, dense_capture = run_op(hidden, residual, True, monkeypatch)
        torch.testing.assert_close(dense, eager, rtol=1e-5, atol=1e-5)
        want = residual[:real] + written_out_rows(steerer, view, steerings, hidden + residual).float()
        torch.testing.assert_close(eager[:real], want, rtol=1e-4, atol=1e-4)
        steered_rows = set(steerer.step.steered_rows_host.tolist())
        for row in range(padded):
            if row not in steered_rows:  # unsteered and padding rows: bit for bit
                assert torch.equal(eager[row], residual[row]) and torch.equal(dense[row], residual[row])
        assert all(r < real for r in steered_rows)
        observed = rt.capture_rows if rt.capture_rows is not None else torch.zeros(0, dtype=torch.long)
        torch.testing.assert_close(dense_capture[observed], eager_capture[observed], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eager_capture[observed], hidden[observed] + eager[observed])
        # The fixed-shape path copies the observed rows only (from its own lanes): the others keep what the
        # eager op left there.
        others = torch.ones(MAX_TOKENS, dtype=torch.bool)
        others[observed] = False
        assert torch.equal(dense_capture[others], eager_capture[others])
        steerer.after_forward()


def test_add_matches_the_written_out_formula(steerer, monkeypatch):
    sae = steerer.observer.saes["s"]
    ops = resolve_spec(
        parse_spec({"features": [{"sae": "s", "index": 5, "value": 2.5}]}), steerer.assets.catalog()
    )
    view = BatchView(
        ["a", "b"], np.array([0, 3, 4]), np.array([0, 7]), np.array([3, 5]), [encode_wire(ops), None]
    )
    steerer.prepare(view)
    hidden, residual = torch.randn(4, D), torch.randn(4, D)
    out, _ = run_op(hidden, residual, False, monkeypatch)
    torch.testing.assert_close(out[:3], residual[:3] + 2.5 * sae.W_dec[5].float())
    assert torch.equal(out[3], residual[3])


def test_forwards_without_preparation_are_unsteered(steerer, monkeypatch):
    """Warm-up, profile and dummy runs (and idle data-parallel ranks) call the model without prepare():
    after a big batch, a smaller forward must neither index the old rows nor be steered."""
    rng = random.Random(1)
    view, padded, _ = random_batch(steerer, rng, 8, 0)
    steerer.prepare(view)
    run_op(torch.randn(padded, D), torch.randn(padded, D), False, monkeypatch)
    steerer.after_forward()
    for size in (1, 2, 3):
        hidden, residual = torch.randn(size, D), torch.randn(size, D)
        eager, _ = run_op(hidden, residual, False, monkeypatch)
        assert torch.equal(eager, residual)
        run_op(hidden, residual, True, monkeypatch)  # the graph path indexes only rows of this batch


def test_stale_tables_of_a_bigger_batch_are_not_applied(steerer, monkeypatch):
    """Even prepared tables that do not fit the forward (a runner that skipped prepare) are left alone."""
    rng = random.Random(2)
    view, _, _ = random_batch(steerer, rng, 8, 1)
    while not steerer.prepare(view):
        view, _, _ = random_batch(steerer, rng, 8, 1)
    last_row = int(steerer.step.steered_rows_host[-1])
    hidden, residual = torch.randn(last_row, D), torch.randn(last_row, D)
    eager, _ = run_op(hidden, residual, False, monkeypatch)
    assert torch.equal(eager, residual)


def test_forged_and_malformed_messages_run_unsteered(steerer, monkeypatch):
    ops = resolve_spec(
        parse_spec({"features": [{"sae": "s", "index": 5, "value": 2.5}]}), steerer.assets.catalog()
    )
    signed = encode_wire(ops)
    forged = [
        signed.split(".", 1)[1],  # unsigned: what a client can put in vllm_xargs on any endpoint
        '{"v": 2, "ops": [["feature", "s", 999999, 2, 0, 1, 0, 0, 0, "add"]]}',
        "not json",
        12,
        ["a", "b"],
    ]
    forged += [
        '["a/b", ["demo"], -1, false]',  # an observation message of wire version 3, unsigned
        # signed, but top_k out of range
        signing.sign(
            encode_wire([], ObservePlan("f" * 32, ("s",), 3, False))
            .split(".", 1)[1]
            .replace('"top_k":3', '"top_k":-1')
        ),
    ]
    n = len(forged)
    view = BatchView(
        [f"x{i}" for i in range(n)],
        np.arange(n + 1, dtype=np.int64),
        np.full(n, 4, dtype=np.int64),
        np.full(n, 3, dtype=np.int64),
        forged,
    )
    assert steerer.prepare(view) == 0
    hidden, residual = torch.randn(n, D), torch.randn(n, D)
    out, _ = run_op(hidden, residual, False, monkeypatch)
    assert torch.equal(out, residual)
    steerer.after_forward()
    assert steerer.stats().rejected_messages == {"steering": n}


def test_steady_decode_writes_no_plans_and_leaving_requests_free_their_rows(steerer, monkeypatch):
    """Plans are written when a request takes a slot, not per step; a request that leaves the batch gives its
    slot and working-set columns back."""
    catalog = steerer.assets.catalog()
    wire = encode_wire(
        resolve_spec(parse_spec({"features": [{"sae": "s", "index": 5, "value": 2.5}]}), catalog)
    )
    tables = steerer.tables[LAYER]
    writes = []
    real_write = tables.write_slots
    monkeypatch.setattr(
        tables, "write_slots", lambda slots, plans: writes.append(slots) or real_write(slots, plans)
    )
    sae = steerer.observer.saes["s"]
    for step in range(4):  # request a decodes one token per step at positions 6, 7, 8, 9
        view = BatchView(
            ["a", "b"], np.array([0, 1, 2]), np.array([6 + step, 3]), np.array([6, 3]), [wire, None]
        )
        assert steerer.prepare(view) == 1
        hidden, residual = torch.randn(2, D), torch.randn(2, D)
        out, _ = run_op(hidden, residual, False, monkeypatch)
        torch.testing.assert_close(out[0], residual[0] + 2.5 * sae.W_dec[5].float())
        assert torch.equal(out[1], residual[1])
        assert steerer.step.token_pos_host[:2].tolist() == [6 + step, 3]
        steerer.after_forward()
    assert len(writes) == 1  # only when "a" took its slot
    steerer.prepare(BatchView(["b"], np.array([0, 1]), np.array([4]), np.array([3]), [None]))
    assert len(writes) == 2 and tables.width == 0 and not steerer.step.slot_of


def test_each_request_is_decoded_once_for_steering_and_observation(steerer, monkeypatch, mailroom):
    """One message per request, decoded on its first step only: not per step, not once per purpose (ops and
    observation), not again when compiled plans are dropped (a runtime load moved bank rows)."""
    catalog = steerer.assets.catalog()
    ops = resolve_spec(parse_spec({"features": [{"sae": "s", "index": 5, "value": 2.5}]}), catalog)
    cid = "e" * 32
    wires = [encode_wire(ops, mailroom.plan(cid, ("s",), 2, False)), encode_wire(ops)]
    decoded = []
    real_decode = RequestPlan.decode
    monkeypatch.setattr(RequestPlan, "decode", lambda text, *a: decoded.append(text) or real_decode(text, *a))
    for step in range(5):
        if step == 3:
            steerer.drop_plans()
        view = BatchView(
            ["a", "b"], np.array([0, 1, 2]), np.array([6 + step, 4 + step]), np.array([6, 4]), wires
        )
        assert steerer.prepare(view) == 2
        run_op(torch.randn(2, D), torch.randn(2, D), False, monkeypatch)
        steerer.after_forward()
    assert sorted(decoded) == sorted(wires)
    assert [r.pos for r in mailroom.read(cid)] == [6, 7, 8, 9, 10]  # observed every step


def test_a_request_beyond_the_working_set_runs_unsteered_and_is_counted(sae_dir, tmp_path, monkeypatch):
    config = parse_config({"saes": [{"id": "s", "path": str(sae_dir)}], "limits": {"working_set_rows": 2}})
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    try:
        catalog = st.assets.catalog()
        wires = [
            encode_wire(resolve_spec(parse_spec({"features": features}), catalog))
            for features in (
                [{"sae": "s", "index": 1, "value": 1.0}, {"sae": "s", "index": 2, "value": 1.0}],
                [{"sae": "s", "index": 3, "value": 1.0}],  # a third distinct row: over capacity
            )
        ]
        view = BatchView(["a", "b"], np.array([0, 1, 2]), np.array([4, 4]), np.array([3, 3]), wires)
        assert st.prepare(view) == 1  # only "a" is steered
        hidden, residual = torch.randn(2, D), torch.randn(2, D)
        out, _ = run_op(hidden, residual, False, monkeypatch)
        assert not torch.equal(out[0], residual[0]) and torch.equal(out[1], residual[1])
        assert st.stats().rejected_messages == {"capacity": 1}
        # "a" leaves: room now, but "b" stays unsteered for the rest of its output (and is counted once).
        view = BatchView(["b"], np.array([0, 1]), np.array([5]), np.array([3]), wires[1:])
        assert st.prepare(view) == 0
        assert st.stats().rejected_messages == {"capacity": 1}
    finally:
        steer_op.LAYERS.clear()


def test_newcomers_that_do_not_fit_together_enter_one_at_a_time_with_plans_made_afresh(
    sae_dir, tmp_path, monkeypatch
):
    """Backing out gives back the inline rows of the requests' plans: the steerer compiles each again before it
    takes a slot, so the plan it writes names rows the request holds (and every row is free once they leave)."""
    config = parse_config(
        {
            "saes": [{"id": "s", "path": str(sae_dir)}],
            "policy": {"allow_inline_vectors": True, "max_inline_vectors": 2},
            "limits": {"working_set_rows": 2},
        }
    )
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    try:
        catalog, bank = st.assets.catalog(), st.banks[LAYER]
        free_before = len(bank._free_scratch)
        u = torch.randn(D, generator=torch.Generator().manual_seed(6))
        a = {
            "features": [{"sae": "s", "index": 1, "value": 1.0}],
            "vectors": [{"values": u.tolist(), "layer": LAYER}],
        }
        b = {"features": [{"sae": "s", "index": 3, "value": 1.0}]}  # a third row: they do not fit together
        wires = [encode_wire(resolve_spec(parse_spec(spec), catalog)) for spec in (a, b)]
        view = BatchView(["a", "b"], np.array([0, 1, 2]), np.array([4, 4]), np.array([3, 3]), wires)
        assert st.prepare(view) == 1
        assert len(bank._free_scratch) == free_before - 1  # a's inline row, taken again and held
        hidden, residual = torch.zeros(2, D), torch.randn(2, D)
        out, _ = run_op(hidden, residual, False, monkeypatch)
        torch.testing.assert_close(out[0], residual[0] + st.observer.saes["s"].W_dec[1].float() + u)
        assert torch.equal(out[1], residual[1])
        assert st.stats().rejected_messages == {"capacity": 1}
        st.after_forward()
        st.prepare(BatchView(["x"], np.array([0, 1]), np.array([4]), np.array([3]), [None]))
        assert len(bank._free_scratch) == free_before and not st.step.slot_of
    finally:
        steer_op.LAYERS.clear()


def _relu_feature(sae_dir: Path, x: torch.Tensor, index: int) -> torch.Tensor:
    """f_i(x) of the test's standard (ReLU) SAE, written out from its file: relu(x · W_enc[:, i] + b_enc[i])."""
    from safetensors.torch import load_file

    w = load_file(str(sae_dir / "sae_weights.safetensors"))
    return torch.relu(x.float() @ w["W_enc"][:, index] + w["b_enc"][index])


def test_conditional_ops_and_inline_vectors_match_the_written_out_formula(steerer, sae_dir, monkeypatch):
    """`when`: "clamp B to 2 where A > t" and "add an inline vector u where A < t", read per token from the
    same x; both paths (eager and the fixed-shape capture path) against the formula."""
    from safetensors.torch import load_file

    w_dec = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]
    g = torch.Generator().manual_seed(7)
    hidden, residual = torch.randn(8, D, generator=g), torch.randn(8, D, generator=g)
    x = hidden + residual
    a, b = 3, 11
    f_a = _relu_feature(sae_dir, x, a)
    ranked = f_a[:6].sort().values
    threshold = float(ranked[2:4].mean())  # between two tokens' values: no token sits on the boundary
    holds = f_a > threshold
    assert 0 < int(holds[:6].sum()) < 6  # the condition holds on some of the steered tokens, not all
    u = torch.randn(D, generator=g)
    spec = {
        "features": [
            {
                "sae": "s",
                "index": b,
                "op": "clamp",
                "value": 2.0,
                "when": {"sae": "s", "index": a, "above": threshold},
            }
        ],
        "vectors": [
            {
                "values": u.tolist(),
                "layer": LAYER,
                "scale": 1.5,
                "when": {"sae": "s", "index": a, "below": threshold},
            }
        ],
    }
    wire = encode_wire(resolve_spec(parse_spec(spec), steerer.assets.catalog()))
    view = BatchView(["a", "b"], np.array([0, 6, 8]), np.array([0, 0]), np.array([6, 2]), [wire, None])
    steerer.prepare(view)
    f_b = _relu_feature(sae_dir, x, b)
    expected = residual.clone()
    for t in range(6):
        if holds[t]:
            expected[t] += (2.0 - f_b[t]) * w_dec[b]
        elif f_a[t] < threshold:
            expected[t] += 1.5 * u
    for capturing in (False, True):
        out, _ = run_op(hidden, residual, capturing, monkeypatch)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[6:], residual[6:])
    assert steerer.tables[LAYER].counts_by_op()["clamp"] == 2 * int(holds[:6].sum())


def test_inline_vector_rows_are_freed_and_never_leak_into_the_next_request(steerer, monkeypatch):
    catalog = steerer.assets.catalog()
    g = torch.Generator().manual_seed(3)
    u1, u2 = torch.randn(D, generator=g), torch.randn(D, generator=g)

    def wire(u):
        return encode_wire(
            resolve_spec(parse_spec({"vectors": [{"values": u.tolist(), "layer": LAYER}]}), catalog)
        )

    bank = steerer.banks[LAYER]
    free_before = len(bank._free_scratch)
    for req, u in (("first", u1), ("second", u2)):  # "first" leaves; "second" gets the freed row
        steerer.prepare(BatchView([req], np.array([0, 1]), np.array([4]), np.array([3]), [wire(u)]))
        assert len(bank._free_scratch) == free_before - 1
        residual = torch.randn(1, D)
        out, _ = run_op(torch.zeros(1, D), residual, False, monkeypatch)
        torch.testing.assert_close(out[0], residual[0] + u)
        steerer.after_forward()
    # "first" comes back (preempted, resumed) while "second" holds the row its old plan named: its plan is
    # made afresh, so each request adds its own vector.
    both = BatchView(
        ["second", "first"], np.array([0, 1, 2]), np.array([5, 4]), np.array([3, 3]), [wire(u2), wire(u1)]
    )
    steerer.prepare(both)
    residual = torch.randn(2, D)
    out, _ = run_op(torch.zeros(2, D), residual, False, monkeypatch)
    torch.testing.assert_close(out, residual + torch.stack([u2, u1]))
    steerer.after_forward()
    steerer.prepare(BatchView(["x"], np.array([0, 1]), np.array([4]), np.array([3]), [None]))
    assert len(bank._free_scratch) == free_before


def test_every_running_request_fits_its_most_inline_vectors(steerer, monkeypatch):
    """Scratch rows are sized max_num_seqs x policy.max_inline_vectors: a full batch, each request at the
    limit, is steered with its own vectors; when they leave, every row is free again."""
    catalog = steerer.assets.catalog()
    bank = steerer.banks[LAYER]
    n = MAX_SEQS
    vectors = torch.randn(n, 2, D, generator=torch.Generator().manual_seed(4))
    wires = [
        encode_wire(
            resolve_spec(
                parse_spec({"vectors": [{"values": v.tolist(), "layer": LAYER} for v in vectors[i]]}), catalog
            )
        )
        for i in range(n)
    ]
    view = BatchView([f"q{i}" for i in range(n)], np.arange(n + 1), np.full(n, 4), np.full(n, 3), wires)
    assert steerer.prepare(view) == n and not bank._free_scratch
    residual = torch.randn(n, D)
    out, _ = run_op(torch.zeros(n, D), residual, False, monkeypatch)
    torch.testing.assert_close(out, residual + vectors.sum(1), rtol=1e-5, atol=1e-5)
    steerer.after_forward()
    steerer.prepare(BatchView(["x"], np.array([0, 1]), np.array([4]), np.array([3]), [None]))
    assert len(bank._free_scratch) == 2 * n and steerer.stats().rejected_messages == {}


def test_abort_when_reports_the_batch_position_of_that_request_only(steerer, sae_dir, monkeypatch, mailroom):
    """The worker reads the abort feature on the residual that predicts the next token (the observed, steered
    residual) and reports that request's batch position (the runner's adapter then forces its end-of-sequence
    token: tests/adapters); other requests are not reported, and a step reports only its own crossings."""
    from steer_plugin.request.wire import AbortSpec

    g = torch.Generator().manual_seed(5)
    hidden, residual = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    index = 4
    value = float(_relu_feature(sae_dir, (hidden + residual)[0:1], index)[0])  # row 0 predicts a's next token
    cids = []
    for bound in (value - 0.01, value + 0.01):  # fires / does not fire
        cid = f"{len(cids):032x}"
        cids.append(cid)
        spec = mailroom.plan(cid, ("s",), 1, False, abort=(AbortSpec("s", index, bound, 1),))
        view = BatchView(
            ["a", "b"], np.array([0, 1, 3]), np.array([5, 0]), np.array([4, 2]), [encode_wire([], spec), None]
        )
        steerer.prepare(view)
        run_op(hidden, residual, False, monkeypatch)
        hits = steerer.after_forward()
        if bound < value:
            assert hits == [0]
            record = [r for r in mailroom.read(cid) if r.abort is not None]
            assert record and record[0].abort[0] == index and record[0].pos == 5
        else:
            assert hits == []
        assert steerer.after_forward() == []  # one step only


OBSERVATION_MODULES = {"captures.py", "observe.py", "probing.py", "residuals.py", "transport.py", "blocks.py"}


def _modules_entered(run) -> set[str]:
    """The steer_plugin modules whose functions `run()` enters (this thread)."""
    entered: set[str] = set()

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and f"{os.sep}steer_plugin{os.sep}" in name:
            entered.add(os.path.basename(name))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return entered


def test_a_step_with_nothing_observed_never_enters_the_observation_path(steerer, monkeypatch, mailroom):
    """Only what is observed pays for observation: a steered step with no observed request plans no reads,
    reads nothing and sends nothing (no observation module runs); the same step with one request observed
    does all three."""
    catalog = steerer.assets.catalog()
    ops = resolve_spec(parse_spec({"features": [{"sae": "s", "index": 5, "value": 2.5}]}), catalog)
    cid = "f" * 32
    observed = encode_wire(ops, mailroom.plan(cid, ("s",), 2, False))
    for wires, wants_reads in (([encode_wire(ops), None], False), ([encode_wire(ops), observed], True)):

        def step(wires=wires):
            view = BatchView(["a", "b"], np.array([0, 1, 2]), np.array([6, 4]), np.array([6, 4]), wires)
            assert steerer.prepare(view) == sum(w is not None for w in wires)  # every wire steers
            run_op(torch.randn(2, D), torch.randn(2, D), False, monkeypatch)
            steerer.after_forward()

        step()  # a request's first step compiles its plan
        entered = _modules_entered(step)
        assert "steerer.py" in entered and "op.py" in entered
        assert bool(entered & OBSERVATION_MODULES) == wants_reads, entered & OBSERVATION_MODULES
    assert [r.pos for r in mailroom.read(cid)] == [4, 4]  # read on both of its steps
