"""Observed tokens: one encode per SAE for all requests, records per request, histograms."""

import torch

from steer_plugin.engine.observe import ObservedRows, Observer
from steer_plugin.monitor import channel
from steer_plugin.sae.model import SparseAutoencoder


def test_records_match_a_direct_topk_encode(tmp_path, monkeypatch):
    monkeypatch.setenv(channel.RUN_DIR_ENV, str(tmp_path))
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(
        W_enc=torch.randn(8, 20, generator=g),
        W_dec=torch.randn(20, 8, generator=g),
        b_enc=torch.zeros(20),
        b_dec=torch.zeros(8),
        architecture="topk",
        k=3,
    )
    x = torch.randn(4, 8, generator=g)  # capture slots
    observer = Observer({"s": sae}, write=True)
    observer.collect(
        [ObservedRows("aaa", "s", 2, [0, 1], [5, 6], 5), ObservedRows("bbb", "s", 3, [3], [9], 9)], {"s": x}
    )
    a, b = channel.ChannelReader("aaa").read_new(), channel.ChannelReader("bbb").read_new()
    assert [r["pos"] for r in a] == [5, 6] and [r["pos"] for r in b] == [9]
    pre = x @ sae.W_enc  # written out: topk of relu'd pre-activations
    for record, row in ((a[0], 0), (a[1], 1), (b[0], 3)):
        values, indices = pre[row].topk(3)
        want = [[int(i), round(float(v), 4)] for i, v in zip(indices, values) if v > 0][: len(record["top"])]
        assert record["top"] == want and record["l0"] == int((values > 0).sum())
    assert len(a[0]["top"]) <= 2 and len(b[0]["top"]) <= 3
    assert (
        observer.snapshot()["l0"]["s"]["counts"][-1] == 0
        and sum(observer.snapshot()["l0"]["s"]["counts"]) == 3
    )
