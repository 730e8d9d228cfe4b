"""Observed tokens: one encode per SAE for all requests, records per request, histograms, watchlist."""

import pytest
import torch

from steer_plugin.engine.observe import ObservedRows, Observer
from steer_plugin.request.records import TokenRecord
from steer_plugin.sae.model import SparseAutoencoder

CID_A, CID_B = "a" * 32, "b" * 32


def topk_sae() -> SparseAutoencoder:
    g = torch.Generator().manual_seed(0)
    return SparseAutoencoder(
        W_enc=torch.randn(8, 20, generator=g),
        W_dec=torch.randn(20, 8, generator=g),
        b_enc=torch.zeros(20),
        b_dec=torch.zeros(8),
        architecture="topk",
        k=3,
    )


def as_dict(r: TokenRecord) -> dict:
    out = {"pos": r.pos, "P": r.num_prompt, "sae": r.sae, "top": [list(t) for t in r.top]}
    if r.l0 is not None:
        out["l0"] = r.l0
    if r.error is not None:
        out["err"] = r.error
    return out


def test_records_match_a_direct_topk_encode(mailroom):
    sae = topk_sae()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))  # capture slots
    observer = Observer({"s": sae}, write=True)
    observer.collect(
        [
            ObservedRows(mailroom.to(CID_A), "s", 2, [0, 1], [5, 6], 5, stats=True),
            ObservedRows(
                mailroom.to(CID_B), "s", 3, [3], [9], 9
            ),  # inspect only: no L0 / error, not in the histograms
        ],
        {"s": x},
    )
    a, b = mailroom.read(CID_A), mailroom.read(CID_B)
    # Written out: the top 3 of the pre-activations kept where positive, everything else 0.
    pre = x @ sae.W_enc  # [4, 20]
    top3 = pre.topk(3)
    f = torch.zeros_like(pre).scatter(1, top3.indices, torch.relu(top3.values))  # [4, 20]

    def top(row: int, k: int) -> list[list]:
        """A request's top k: its k largest activations, the positive ones, rounded to 4 places."""
        values, indices = f[row].topk(k)
        return [[int(i), round(float(v), 4)] for i, v in zip(indices, values) if v > 0]

    def error(row: int):
        x_hat = f[row] @ sae.W_dec  # b_dec = 0
        return pytest.approx(float(((x[row] - x_hat) ** 2).sum() / (x[row] ** 2).sum()), rel=1e-4, abs=1e-5)

    assert [as_dict(r) for r in a] == [
        {"pos": 5, "P": 5, "sae": "s", "top": top(0, 2), "l0": int((f[0] > 0).sum()), "err": error(0)},
        {"pos": 6, "P": 5, "sae": "s", "top": top(1, 2), "l0": int((f[1] > 0).sum()), "err": error(1)},
    ]
    assert [as_dict(r) for r in b] == [
        {"pos": 9, "P": 9, "sae": "s", "top": top(3, 3)}
    ]  # inspect only: no l0 / err
    assert all(len(r.top) == 2 for r in a) and len(b[0].top) == 3  # the rows have positive top-3s
    snapshot = observer.snapshot()
    assert sum(snapshot.l0["s"].counts) == 2 and sum(snapshot.reconstruction_error["s"].counts) == 2


def test_inspect_only_reads_of_a_topk_sae_match_the_dense_encode(mailroom):
    """Top-K alone (no stats, nothing watched) takes a shorter path for TopK SAEs (one top-K of the
    pre-activations): same records as the top features of the dense encode, for top_k below, at and above k."""
    sae = topk_sae()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    x[5] = -x[4]  # (a row with few positive pre-activations: fewer than k features active)
    pre = x @ sae.W_enc  # [6, 20], b_enc = b_dec = 0
    top3 = pre.topk(3)
    f = torch.zeros_like(pre).scatter(1, top3.indices, torch.relu(top3.values))  # the SAE's features
    cids = ["c" * 31 + str(k) for k in (1, 3, 5)]
    Observer({"s": sae}, write=True).collect(
        [ObservedRows(mailroom.to(cid), "s", k, [0, 1, 2, 3, 4, 5], list(range(10, 16)), 10) for cid, k in
         zip(cids, (1, 3, 5))],
        {"s": x},
    )  # fmt: skip
    for cid, k in zip(cids, (1, 3, 5)):
        records = mailroom.read(cid)
        for row, r in enumerate(records):
            values, indices = f[row].topk(k)
            expected = [(int(i), round(float(v), 4)) for i, v in zip(indices, values) if v > 0]
            assert list(r.top) == expected and r.l0 is None and r.error is None
    assert (pre[5] > 0).sum() < 20  # (the mirrored row has its own, different, active set)


def test_watched_feature_outside_top_k_is_reported(mailroom):
    sae = topk_sae()
    sae.architecture, sae.k = "relu", None  # every positive pre-activation is active
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    pre = torch.relu(x @ sae.W_enc)  # [6, 20]
    # A feature active on some rows but never in their top 1.
    top1 = pre.argmax(-1)
    candidates = [i for i in range(20) if (pre[:, i] > 0).any() and not (top1 == i).any()]
    watched = candidates[0]
    threshold = float(pre[:, watched][pre[:, watched] > 0].min()) / 2
    Observer({"s": sae}, write=True).collect(
        [
            ObservedRows(
                mailroom.to(CID_A), "s", 1, list(range(6)), list(range(6)), 0, ((watched, threshold),)
            )
        ],
        {"s": x},
    )
    records = mailroom.read(CID_A)
    assert [r.pos for r in records] == list(range(6))
    fired = [r.pos for r in records if any(i == watched for i, _ in r.watch)]
    assert fired == [p for p in range(6) if pre[p, watched] > threshold]
    assert fired and all(r.top[0][0] != watched for r in records)


def test_records_of_a_finished_request_are_dropped_as_late(mailroom):
    """A worker step that lands after the API process finished the request adds nothing anywhere: counted late."""
    from prometheus_client import REGISTRY

    def late() -> float:
        return REGISTRY.get_sample_value("steer_observation_dropped_total", {"reason": "late"}) or 0.0

    Observer({"s": topk_sae()}, write=True).collect(
        [ObservedRows(mailroom.to(CID_A), "s", 1, [0], [0], 1)], {"s": torch.randn(1, 8)}
    )
    assert len(mailroom.read(CID_A)) == 1
    before = late()
    mailroom.inbox.close(CID_A)
    Observer({"s": topk_sae()}, write=True).collect(
        [ObservedRows(mailroom.to(CID_B)._replace(cid=CID_A), "s", 1, [0], [1], 1)], {"s": torch.randn(1, 8)}
    )
    assert mailroom.read(CID_B) == []  # (the marker after it arrived: so had the late message)
    assert late() == before + 1
    assert CID_A not in mailroom.inbox.boxes


def test_traced_feature_is_reported_on_every_token(mailroom):
    """inspect.features: a watch at TRACE_THRESHOLD reports the feature's activation on every token, zeros too."""
    from steer_plugin.request.wire import TRACE_THRESHOLD

    sae = topk_sae()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    pre = x @ sae.W_enc  # written out: top 3 of the pre-activations, kept where positive
    f = torch.zeros(6, 20).scatter(1, pre.topk(3).indices, torch.relu(pre.topk(3).values))
    traced = int((f > 0).sum(0).argmin())  # the feature active on the fewest rows (zero on some)
    assert (f[:, traced] == 0).any()
    Observer({"s": sae}, write=True).collect(
        [
            ObservedRows(
                mailroom.to(CID_A), "s", 1, list(range(6)), list(range(6)), 0, ((traced, TRACE_THRESHOLD),)
            )
        ],
        {"s": x},
    )
    records = mailroom.read(CID_A)
    assert [dict(r.watch)[traced] for r in records] == [round(float(v), 4) for v in f[:, traced]]


def test_attention_sink_positions_are_flagged_and_kept_out_of_histograms_and_aborts(mailroom):
    """sink_positions=1: position 0 is flagged `sink`, counted in no histogram, and never fires abort_when,
    whatever its activations; position 1 is an ordinary token."""
    from steer_plugin.request.wire import AbortSpec

    sae = topk_sae()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    top = int((x[0] @ sae.W_enc).argmax())  # fires at position 0 (largest pre-activation, so in the top 3)
    group = ObservedRows(
        mailroom.to(CID_A),
        "s",
        3,
        [0, 1],
        [0, 1],
        1,
        stats=True,
        abort=(AbortSpec("s", top, -1e9, 1),),
        predicting=0,
        req_index=0,
    )
    observer = Observer({"s": sae}, write=True, sink_positions=1)
    hits = observer.collect([group], {"s": x})
    records = mailroom.read(CID_A)
    assert [r.sink for r in records] == [True, False]
    assert hits == []  # the condition holds at position 0 (any activation > -1e9), but it is a sink
    snapshot = observer.snapshot()
    assert sum(snapshot.l0["s"].counts) == 1 and sum(snapshot.reconstruction_error["s"].counts) == 1
    # The same read without a sink rule fires and counts both tokens.
    plain = Observer({"s": sae}, write=True, sink_positions=0)
    assert plain.collect([group._replace(to=mailroom.to(CID_B))], {"s": x})
    assert sum(plain.snapshot().l0["s"].counts) == 2


def test_monitoring_summary_leaves_sinks_out():
    from steer_plugin.monitor.log import summarise

    records = [
        TokenRecord(0, 1, "s", ((7, 900.0),), sink=True),
        TokenRecord(1, 1, "s", ((3, 2.0), (7, 1.0))),
    ]
    assert summarise(records, "s", {}, 5) == [
        {"index": 3, "max_activation": 2.0, "tokens": 1, "label": None},
        {"index": 7, "max_activation": 1.0, "tokens": 1, "label": None},
    ]


def test_requests_of_two_api_processes_each_get_their_own_rows(mailroom):
    """A step's requests reply to two API processes, their rows interleaved: each process gets one block with its
    requests' rows only (gathered), each request its own top K, L0 and watched features; nowhere gets nothing."""
    from steer_plugin.request.wire import Addressee

    from ..conftest import Mailroom

    sae = topk_sae()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    pre = x @ sae.W_enc  # [5, 20]
    top3 = pre.topk(3)
    f = torch.zeros_like(pre).scatter(1, top3.indices, torch.relu(top3.values))  # [5, 20]
    watched = int(top3.indices[3, 0])  # row 3's strongest feature, watched by D above 0
    other = Mailroom()
    try:
        cid_c, cid_d = "c" * 32, "d" * 32
        Observer({"s": sae}, write=True).collect(
            [
                ObservedRows(mailroom.to(CID_A), "s", 2, [0, 1], [5, 6], 5),
                ObservedRows(other.to(CID_B), "s", 1, [2], [9], 9, stats=True),
                ObservedRows(Addressee("", cid_c), "s", 1, [4], [3], 3),  # nowhere
                ObservedRows(mailroom.to(cid_d), "s", 3, [3], [7], 7, ((watched, 0.0),)),
            ],
            {"s": x},
        )
        got = {cid: room.read(cid) for room, cid in ((mailroom, CID_A), (other, CID_B), (mailroom, cid_d))}
    finally:
        other.close()

    def top(row: int, k: int) -> tuple:
        values, indices = f[row].topk(k)
        return tuple((int(i), round(float(v), 4)) for i, v in zip(indices, values) if v > 0)

    assert [(r.pos, r.top, r.l0) for r in got[CID_A]] == [(5, top(0, 2), None), (6, top(1, 2), None)]
    ((b,),) = [got[CID_B]]
    assert (b.pos, b.top, b.l0) == (9, top(2, 1), int((f[2] > 0).sum()))
    ((d,),) = [got[cid_d]]
    assert (d.pos, d.top, d.watch) == (7, top(3, 3), ((watched, round(float(f[3, watched]), 4)),))
