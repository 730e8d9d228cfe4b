"""Raw residual reads for the fit endpoints, in a real Steerer and the op (eager and fixed-shape): the records
equal the residual the op leaves after the layer; layers the worker does not capture are dropped; and one fit
end to end through the API-side Fitter (reading.py's plan, the worker, the transport, pooling, the fit, the save
under the runtime root and the admin's load into the worker), the engine's forward replaced by the op alone
on residuals made from the token ids."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import torch

from steer_plugin.engine import op as steer_op
from steer_plugin.engine.steerer import BatchView
from steer_plugin.fitting.estimate import pool
from steer_plugin.fitting.reading import residual_plan, rows_by_layer
from steer_plugin.fitting.run import Engine
from steer_plugin.probes.format import load_probe
from steer_plugin.request.records import ResidualRecord
from steer_plugin.request.wire import WIRE_KEY, RequestPlan

from .test_runtime_loads import LAYER, OTHER_LAYER, D, admin_setup, make_config, make_steerer, root  # noqa: F401

CID = "d" * 32


@pytest.mark.parametrize("capturing", [False, True])
def test_the_worker_writes_the_residual_rows_after_the_layer(
    root,  # noqa: F811
    tmp_path,
    monkeypatch,
    capturing,
    mailroom,
):
    st = make_steerer(make_config(root))
    try:
        wire = RequestPlan.build(
            [], observe=mailroom.plan(CID, (), 1, True, residuals=(OTHER_LAYER, 1))
        ).encode()
        assert st.observe_for("a", wire).residuals == (OTHER_LAYER,)  # layer 1: nothing captured there
        st.prepare(
            BatchView(["a", "b"], np.array([0, 4, 6]), np.array([0, 0]), np.array([4, 2]), [wire, None])
        )
        monkeypatch.setattr(steer_op, "_capturing", lambda: capturing)
        g = torch.Generator().manual_seed(9)
        hidden, residual = torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)
        after = hidden + torch.ops.steer_plugin.steer_residual(hidden, residual, OTHER_LAYER)
        st.after_forward()
        records = mailroom.read(CID)
        assert all(isinstance(r, ResidualRecord) for r in records)
        assert [(r.pos, r.layer, r.num_prompt) for r in records] == [(p, OTHER_LAYER, 4) for p in range(4)]
        rows = rows_by_layer(records, (OTHER_LAYER,), 4)[OTHER_LAYER]
        assert rows.dtype == np.float32 and np.array_equal(rows, after[:4].numpy())  # exact, request a's rows
        with pytest.raises(ValueError):
            rows_by_layer(records[:3], (OTHER_LAYER,), 4)
    finally:
        steer_op.LAYERS.clear()


def test_a_residual_plan_observes_the_prompt_steers_nothing_and_is_bound():
    plan = RequestPlan.decode(residual_plan((3, 5), "steer-fit-x", "ipc://@x").encode(), "cmpl-steer-fit-x-0")
    assert plan.ops == () and plan.observes_prompt and plan.observe.residuals == (3, 5)
    assert plan.observe.saes == () and plan.observe.probes == () and plan.binding.uses == 1
    assert plan.observe.reply_to == "ipc://@x"
    with pytest.raises(ValueError):
        RequestPlan.decode(residual_plan((3,), "steer-fit-x", "ipc://@x").encode(), "cmpl-other")


EMBED = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
EMBED[7] += 3.0  # token 7 carries "the concept"


def fake_engine(st, broadcast) -> Engine:
    """The server's side of a fit, with the model's forward replaced by the op at the layer on residuals
    made from the token ids (x_t = EMBED[id_t]); everything else is the plugin's own code."""

    async def tokenize(text: str, field: str) -> list[int]:
        return [ord(c) % 64 for c in text]

    async def call(body: dict, request_id: str) -> tuple[int, dict]:
        ids = body["prompt"]
        req_id = f"cmpl-{request_id}-0"
        n = len(ids)
        st.prepare(
            BatchView(
                [req_id], np.array([0, n]), np.array([0]), np.array([n]), [body["vllm_xargs"][WIRE_KEY]]
            )
        )
        x = EMBED[ids]
        torch.ops.steer_plugin.steer_residual(x, torch.zeros_like(x), OTHER_LAYER)
        st.after_forward()
        return 200, {}

    return Engine(tokenize, call, broadcast, 512)


def test_a_probe_fit_end_to_end_in_process(root, tmp_path, monkeypatch, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="steer_plugin")
    service, (st,), broadcast = admin_setup(root, monkeypatch, tmp_path, workers=1)
    monkeypatch.setattr(steer_op, "_capturing", lambda: False)
    try:
        texts = [("a\x07b" * (1 + i % 3), "on") for i in range(8)] + [
            ("abc" * (1 + i % 3), "off") for i in range(8)
        ]
        body = {
            "id": "fitted",
            "layer": OTHER_LAYER,
            "labels": ["off", "on"],
            "examples": [{"text": t, "label": label} for t, label in texts],
            "save_to": "fitted-probe",
        }
        result = asyncio.run(service.fitter.fit_probe(body, fake_engine(st, broadcast)))
        assert result["auroc"] == 1.0 and result["labels"] == ["on"] and result["held_out"] == 4
        assert (
            "fit of probe fitted: read 16/16 texts" in caplog.text
        )  # progress (every 32 texts, and the last)
        assert result["path"] == str(root / "fitted-probe") and "fitted" in st.prober.probes
        probe = load_probe(result["path"])
        x = np.stack([pool(EMBED[[ord(c) % 64 for c in t]].numpy(), "mean", 1) for t, _ in texts])
        scores = torch.sigmoid(torch.tensor(x).float() @ probe.weight[0] + probe.bias[0])
        assert all((s > 0.5) == (label == "on") for s, (_, label) in zip(scores.tolist(), texts))
        assert service.catalog.probes["fitted"].layer == OTHER_LAYER
        again = dict(body, id="other")  # its folder exists: refused before anything is read
        with pytest.raises(Exception) as err:
            asyncio.run(service.fitter.fit_probe(again, fake_engine(st, broadcast)))
        assert (err.value.status, err.value.path) == (409, "save_to")
        vector = {"id": "dir", "layer": OTHER_LAYER, "pairs": [{"positive": "\x07\x07", "negative": "ab"}]}
        fitted = asyncio.run(service.fitter.fit_vector(vector, fake_engine(st, broadcast)))
        want = EMBED[7] - EMBED[ord("b") % 64]  # pooled: the mean over positions 1.. (position 0 is a sink)
        got = st.assets.vectors["dir"].vector
        assert (
            torch.allclose(got, want / want.norm(), atol=1e-5)
            and abs(fitted["norm"] - float(want.norm())) < 1e-4
        )
    finally:
        steer_op.LAYERS.clear()
