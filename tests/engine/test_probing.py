"""Probes scored in the worker: a real Steerer and the op, eager and fixed-shape (CUDA-graph capture forced on
the CPU); the records equal act(W x + b) written out on the residual the op leaves, at a layer with an SAE and
at a layer with nothing but the probe; requests that did not ask get nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_plugin.config import parse_config
from steer_plugin.engine import op as steer_op
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.probes.format import ProbeMeta, save_probe
from steer_plugin.request.records import ProbeRecord
from steer_plugin.request.resolve import resolve_spec
from steer_plugin.request.schema import parse_spec
from steer_plugin.request.wire import ObservePlan, ProbeAbortSpec, RequestPlan

from .test_steerer_steps import LAYER, MAX_SEQS, MAX_TOKENS, D, sae_dir  # noqa: F401 (a fixture)

PROBE_LAYER = 0  # nothing else there: the probe alone puts the op after this layer
CID_A, CID_B = "a" * 32, "b" * 32


@pytest.fixture
def probes(tmp_path) -> dict:
    g = torch.Generator().manual_seed(3)
    made = {}
    for pid, layer, labels, activation in (
        ("mood", LAYER, ("happy", "sad"), "sigmoid"),
        ("raw", LAYER, ("x",), "identity"),
        ("early", PROBE_LAYER, ("y",), "sigmoid"),
    ):
        weight, bias = torch.randn(len(labels), D, generator=g), torch.randn(len(labels), generator=g)
        folder = save_probe(tmp_path / pid, ProbeMeta(layer, labels, activation), weight, bias)
        made[pid] = (folder, layer, weight, bias, activation)
    return made


@pytest.fixture
def steerer(sae_dir, probes, tmp_path, monkeypatch):  # noqa: F811
    config = parse_config(
        {
            "saes": [{"id": "s", "path": str(sae_dir)}],
            "probes": [{"id": pid, "path": str(p[0])} for pid, p in probes.items()],
        }
    )
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    yield st
    steer_op.LAYERS.clear()


def written_out(x: torch.Tensor, weight, bias, activation) -> torch.Tensor:
    logits = torch.stack([torch.stack([weight[c] @ row + bias[c] for c in range(len(bias))]) for row in x])
    return torch.sigmoid(logits) if activation == "sigmoid" else logits


@pytest.mark.parametrize("capturing", [False, True])
def test_scores_equal_the_formula_on_the_steered_residual(steerer, probes, capturing, monkeypatch, mailroom):
    catalog = steerer.assets.catalog()
    add = resolve_spec(parse_spec({"features": [{"sae": "s", "index": 3, "value": 4.0}]}), catalog)
    wires = [
        # A: steered, its prompt and generation scored by all three probes
        RequestPlan.build(
            add, observe=mailroom.plan(CID_A, (), 1, True, probes=("mood", "raw", "early"))
        ).encode(),
        # B: steered the same, scored by one probe on its sampled token only
        RequestPlan.build(add, observe=mailroom.plan(CID_B, (), 1, False, probes=("early",))).encode(),
        None,  # C: plain
    ]
    query_start = np.array([0, 3, 5, 7])
    view = BatchView(["A", "B", "C"], query_start, np.array([0, 4, 6]), np.array([3, 5, 7]), wires)
    steerer.prepare(view)
    monkeypatch.setattr(steer_op, "_capturing", lambda: capturing)
    g = torch.Generator().manual_seed(5)
    after = {}
    for layer in (PROBE_LAYER, LAYER):
        hidden, residual = torch.randn(7, D, generator=g), torch.randn(7, D, generator=g)
        out = torch.ops.steer_plugin.steer_residual(hidden, residual, layer)
        after[layer] = hidden + out  # [7, D]: the residual stream the next layer reads
    steerer.after_forward()
    assert not torch.equal(after[LAYER][:5], (hidden + residual)[:5])  # the add did steer A and B

    def by_probe(cid: str) -> list[tuple[str, int, tuple[float, ...], ProbeRecord]]:
        """(probe, position, scores, record) per token and probe: a record holds a layer's probes for a step."""
        records = [r for r in mailroom.read(cid) if isinstance(r, ProbeRecord)]
        return [(pid, pos, s, r) for r in records for pos, found in r.tokens() for pid, s in found.items()]

    a, b = by_probe(CID_A), by_probe(CID_B)
    # A: prompt rows 0..2 at positions 0..2 (position 0 is the attention sink), every probe.
    assert sorted((pid, pos) for pid, pos, _, _ in a) == sorted((p, pos) for p in probes for pos in range(3))
    for pid, pos, scores, r in a:
        _, layer, weight, bias, activation = probes[pid]
        want = written_out(after[layer][[pos]], weight, bias, activation)[0]
        assert torch.allclose(torch.tensor(scores), want, atol=1e-5), (pid, pos, want)
        assert r.sinks == (0,) and r.num_prompt == 3
    # B: only the row whose logits give its sampled token (row 4, position 5), only "early".
    assert [(pid, pos) for pid, pos, _, _ in b] == [("early", 5)] and b[0][3].sinks == ()
    _, _, weight, bias, _ = probes["early"]
    assert torch.allclose(
        torch.tensor(b[0][2]), written_out(after[PROBE_LAYER][[4]], weight, bias, "sigmoid")[0], atol=1e-5
    )


def test_a_probe_only_layer_carries_the_op_and_narrowing_drops_unknown_probes(steerer):
    assert PROBE_LAYER in steerer.layers and steerer.runtimes[PROBE_LAYER].observable
    spec = ObservePlan(CID_A, (), 1, False, probes=("early", "not-here"))
    assert steerer._narrowed(spec).probes == ("early",)


def test_abort_when_on_a_probe_fires_on_the_predicting_row_only(steerer, probes, monkeypatch, mailroom):
    """The condition is tested on the residual whose logits give the sampled token; the batch index of the
    request comes back (the runner forces its end token); a record carries the crossing."""
    _, _, weight, bias, _ = probes["early"]
    g = torch.Generator().manual_seed(8)
    hidden, residual = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    monkeypatch.setattr(steer_op, "_capturing", lambda: False)
    plain = torch.ops.steer_plugin.steer_residual(hidden, residual, PROBE_LAYER)  # nothing steered: as is
    score = written_out(hidden + plain, weight, bias, "sigmoid")[:, 0]  # [5]
    threshold = float(score[4]) - 1e-3  # row 4 (A's sampled row) crosses; test the other rows too
    abort = (ProbeAbortSpec("early", 0, threshold, 1),)
    wire = RequestPlan.build(
        [], observe=mailroom.plan(CID_A, (), 1, True, probes=("early",), probe_abort=abort)
    )
    view = BatchView(
        ["B", "A"], np.array([0, 2, 5]), np.array([0, 0]), np.array([9, 3]), [None, wire.encode()]
    )
    steerer.prepare(view)
    torch.ops.steer_plugin.steer_residual(hidden, residual, PROBE_LAYER)
    assert steerer.after_forward() == [1]  # A, the second request of the batch
    (record,) = mailroom.read(CID_A)  # one record: the step's three rows
    assert record.positions == (0, 1, 2)
    assert record.abort == (
        2,
        "early",
        0,
        pytest.approx(float(score[4]), abs=1e-5),
    )  # the predicting row only


def test_a_step_observed_on_every_row_is_captured_without_a_gather(steerer, probes, monkeypatch, mailroom):
    """Rows 0..n-1 observed (the eager op's in-place copy) score as the formula says, like gathered rows."""
    wire = RequestPlan.build([], observe=mailroom.plan(CID_A, (), 1, True, probes=("early",))).encode()
    steerer.prepare(BatchView(["A"], np.array([0, 4]), np.array([0]), np.array([4]), [wire]))
    assert steerer.runtimes[PROBE_LAYER].capture_prefix == 4
    monkeypatch.setattr(steer_op, "_capturing", lambda: False)
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(4, D, generator=g).bfloat16()
    residual = torch.randn(4, D, generator=g).bfloat16()
    out = torch.ops.steer_plugin.steer_residual(hidden, residual, PROBE_LAYER)
    steerer.after_forward()
    _, _, weight, bias, _ = probes["early"]
    want = written_out(hidden.float() + out.float(), weight, bias, "sigmoid")  # [4, 1]
    (record,) = mailroom.read(CID_A)
    assert [pos for pos, _ in record.tokens()] == [0, 1, 2, 3]
    assert torch.allclose(torch.tensor([found["early"] for _, found in record.tokens()]), want, atol=1e-5)


def test_the_in_place_capture_sums_every_row_in_float32_whatever_the_chunking(monkeypatch):
    """The CPU copy goes a cache-sized block of rows at a time: chunks of 3 rows over 8 (a short last chunk)
    give hidden + out in float32 on every row, and leave the rows past n alone."""
    monkeypatch.setattr(steer_op, "CPU_CAPTURE_CHUNK", 3 * D)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, D, generator=g).bfloat16()
    out = torch.randn(10, D, generator=g).bfloat16()
    capture = torch.full((12, D), -7.0)
    steer_op.capture_sum(capture, hidden, out, 8)
    assert torch.equal(capture[:8], hidden[:8].float() + out[:8].float())
    assert torch.equal(capture[8:], torch.full((4, D), -7.0))


def test_a_windowed_abort_fires_on_the_first_full_window_whose_mean_crosses(
    steerer, probes, monkeypatch, mailroom
):
    """abort_when with `window` 3: one spiking token does not stop the request (a per-token condition with the
    same threshold does); sustained ones do, at the first position whose last-3 mean (written out here)
    crosses."""
    _, _, weight, bias, _ = probes["early"]
    w = weight[0] / weight[0].norm() ** 2  # hidden = c * w: the probe's logit is c + bias
    # The probe's logit at predicting positions 2 (the prompt's last), 3, 4, ...: a spike, then a sustained run.
    logits = [-8.0, 8.0, -8.0, -8.0, 4.0, 4.0, 4.0, 4.0]
    monkeypatch.setattr(steer_op, "_capturing", lambda: False)
    scores = [torch.sigmoid(torch.tensor(c + float(bias[0]))).item() for c in logits]
    means = {2 + k: sum(scores[k - 2 : k + 1]) / 3 for k in range(2, len(scores))}  # position -> last-3 mean
    threshold = max(means[p] for p in (4, 5)) + 1e-3  # the windows holding the spike stay below it
    assert scores[1] > threshold  # ... though the spike alone is above it
    windowed = mailroom.plan(
        CID_A, (), 1, False, probes=("early",), probe_abort=(ProbeAbortSpec("early", 0, threshold, 1, 3),)
    )
    per_token = mailroom.plan(
        CID_B, (), 1, False, probes=("early",), probe_abort=(ProbeAbortSpec("early", 0, threshold, 1),)
    )
    wires = [RequestPlan.build([], observe=o).encode() for o in (windowed, per_token)]
    fired_at: dict[str, int] = {}
    for step, c in enumerate(logits):
        live = [name for name in ("A", "B") if name not in fired_at]
        rows = 3 if step == 0 else 1  # the prompt's prefill, then one token a step
        one = torch.cat([torch.zeros(rows - 1, D), (c * w).unsqueeze(0)])  # [rows, D]: its last row predicts
        hidden = one.repeat(len(live), 1)  # [rows * requests, D]
        view = BatchView(
            live,
            np.arange(len(live) + 1) * rows,
            np.full(len(live), 0 if step == 0 else 2 + step),
            np.full(len(live), 3),
            [wires[0 if name == "A" else 1] for name in live],
        )
        steerer.prepare(view)
        torch.ops.steer_plugin.steer_residual(hidden, torch.zeros_like(hidden), PROBE_LAYER)
        for i in steerer.after_forward():
            fired_at[live[i]] = 2 + step
    first_crossing = next(p for p, m in sorted(means.items()) if m > threshold)
    assert (
        fired_at == {"B": 3, "A": first_crossing} and first_crossing == 7
    )  # two sustained tokens in the window
    (abort,) = [r.abort for r in mailroom.read(CID_A) if r.abort is not None]
    assert abort[:3] == (first_crossing, "early", 0)
    assert abort[3] == pytest.approx(means[first_crossing], abs=1e-5)  # the window's mean, not a token's


def test_a_probe_of_sae_features_scores_the_written_out_encode(sae_dir, tmp_path, monkeypatch, mailroom):  # noqa: F811
    """probe.json `sae`: the probe reads the SAE's features of the steered residual, act(W·f + b) with
    f = relu(x·W_enc + b_enc) written out from the SAE's own file, next to a probe of the residual at the same
    layer (both in one record)."""
    from safetensors.torch import load_file

    from .test_steerer_steps import D_SAE

    sae_file = load_file(str(sae_dir / "sae_weights.safetensors"))
    g = torch.Generator().manual_seed(11)
    on_features = (torch.randn(2, D_SAE, generator=g), torch.randn(2, generator=g))
    on_residual = (torch.randn(1, D, generator=g), torch.randn(1, generator=g))
    folders = {
        "feat": save_probe(tmp_path / "feat", ProbeMeta(LAYER, ("on", "off"), sae="s"), *on_features),
        "resid": save_probe(tmp_path / "resid", ProbeMeta(LAYER, ("r",), "identity"), *on_residual),
    }
    config = parse_config(
        {
            "saes": [{"id": "s", "path": str(sae_dir)}],
            "probes": [{"id": pid, "path": str(folder)} for pid, folder in folders.items()],
        }
    )
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    try:
        wire = RequestPlan.build([], observe=mailroom.plan(CID_A, (), 1, True, probes=("feat", "resid")))
        st.prepare(BatchView(["A"], np.array([0, 3]), np.array([0]), np.array([3]), [wire.encode()]))
        monkeypatch.setattr(steer_op, "_capturing", lambda: False)
        hidden, residual = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
        x = hidden + torch.ops.steer_plugin.steer_residual(hidden, residual, LAYER)  # [3, D]
        st.after_forward()
    finally:
        steer_op.LAYERS.clear()
    records = [r for r in mailroom.read(CID_A) if isinstance(r, ProbeRecord)]
    got = {(pos, pid): s for r in records for pos, found in r.tokens() for pid, s in found.items()}
    assert sorted(got) == sorted((pos, pid) for pos in range(3) for pid in folders)
    features = torch.relu(x @ sae_file["W_enc"] + sae_file["b_enc"])  # [3, D_SAE] ("standard" SAE)
    assert (features > 0).any(dim=1).all()  # (the features are not all zero: the probe reads something)
    for pos in range(3):
        want = written_out(features[[pos]], *on_features, "sigmoid")[0]
        assert torch.allclose(torch.tensor(got[(pos, "feat")]), want, atol=1e-5)
        want = written_out(x[[pos]], *on_residual, "identity")[0]
        assert torch.allclose(torch.tensor(got[(pos, "resid")]), want, atol=1e-5)


def test_a_probe_whose_sae_is_gone_is_left_out_of_the_record(mailroom):
    """A worker that no longer has a probe's SAE (unloaded there) scores the layer's other probes and leaves that
    one out of the record: no column of NaN, no error."""
    from steer_plugin.engine.probing import ProbedRows, ProbeReader
    from steer_plugin.probes.format import Probe

    g = torch.Generator().manual_seed(12)
    residual = Probe(ProbeMeta(LAYER, ("r",), "identity"), torch.randn(1, D, generator=g), torch.zeros(1))
    features = Probe(ProbeMeta(LAYER, ("on",), sae="gone"), torch.randn(1, 5, generator=g), torch.zeros(1))
    reader = ProbeReader({"feat": features, "resid": residual}, torch.device("cpu"), write=True)
    x = torch.randn(2, D, generator=g)
    reader.collect(
        [ProbedRows(mailroom.to(CID_A), LAYER, ("feat", "resid"), [0, 1], [4, 5], 4)], {LAYER: x}, {}
    )
    (record,) = [r for r in mailroom.read(CID_A) if isinstance(r, ProbeRecord)]
    assert record.probes == ("resid",)
    got = [found for _, found in record.tokens()]
    want = (x @ residual.weight.T)[:, 0]
    assert [list(f) for f in got] == [["resid"], ["resid"]]
    assert torch.allclose(torch.tensor([f["resid"][0] for f in got]), want, atol=1e-5)


def test_requests_of_two_api_processes_each_get_their_own_rows(mailroom):
    """A step's requests reply to two API processes, their rows interleaved in the batch: each process gets
    one block with its requests' rows only (gathered), each request its own scores and probes; a request with
    nowhere to send gets nothing."""
    from steer_plugin.engine.probing import ProbedRows, ProbeReader
    from steer_plugin.probes.format import Probe
    from steer_plugin.request.wire import Addressee

    from ..conftest import Mailroom

    g = torch.Generator().manual_seed(13)
    one = Probe(ProbeMeta(LAYER, ("on",), "identity"), torch.randn(1, D, generator=g), torch.zeros(1))
    two = Probe(ProbeMeta(LAYER, ("x", "y"), "sigmoid"), torch.randn(2, D, generator=g), torch.randn(2))
    reader = ProbeReader({"one": one, "two": two}, torch.device("cpu"), write=True)
    x = torch.randn(6, D, generator=g)
    other = Mailroom()
    try:
        cid_c, cid_d = "c" * 32, "d" * 32
        groups = [
            ProbedRows(mailroom.to(CID_A), LAYER, ("one", "two"), [0, 1], [3, 4], 3),
            ProbedRows(other.to(CID_B), LAYER, ("two",), [2], [7], 5),
            ProbedRows(Addressee("", cid_c), LAYER, ("one",), [3], [2], 1),  # nowhere
            ProbedRows(mailroom.to(cid_d), LAYER, ("one",), [4, 5], [0, 1], 2),
        ]
        reader.collect(groups, {LAYER: x})
        got = {cid: room.read(cid) for room, cid in ((mailroom, CID_A), (other, CID_B), (mailroom, cid_d))}
    finally:
        other.close()
    want_one = (x @ one.weight.T)[:, 0]  # [6]
    want_two = torch.sigmoid(x @ two.weight.T + two.bias)  # [6, 2]
    for cid, rows, positions, probes in (
        (CID_A, [0, 1], (3, 4), ("one", "two")),
        (CID_B, [2], (7,), ("two",)),
        (cid_d, [4, 5], (0, 1), ("one",)),
    ):
        (record,) = got[cid]
        assert (record.probes, record.positions) == (probes, positions), cid
        for (_, found), row in zip(record.tokens(), rows):
            if "one" in probes:
                assert abs(found["one"][0] - float(want_one[row])) < 1e-5
            if "two" in probes:
                assert torch.allclose(torch.tensor(found["two"]), want_two[row], atol=1e-6)
    assert got[cid_d][0].sinks == (0,) and got[CID_A][0].sinks == ()
