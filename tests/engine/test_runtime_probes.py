"""Probes loaded and unloaded at runtime, in real Steerers and through the API-side Admin: scores by the
formula act(W x + b) from the file once loaded, nothing (and no error) after an unload, even for a request
that asked for it; loads only at layers whose residual the workers capture, the admin checks (roots,
duplicates, configured probes, the in-flight rule) naming the field. The workers' transport is replaced by
calling each worker's command handler in-process (as tests/engine/test_runtime_loads.py does)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from steer_plugin.config import parse_config
from steer_plugin.engine import op as steer_op
from steer_plugin.engine.steerer import BatchView
from steer_plugin.messages import LoadCommand
from steer_plugin.probes.format import ProbeMeta, save_probe
from steer_plugin.request.records import ProbeRecord
from steer_plugin.request.schema import SpecError
from steer_plugin.request.wire import RequestPlan

from .test_runtime_loads import LAYER, OTHER_LAYER, D, admin_setup, make_config, make_steerer, root  # noqa: F401

CID = "c" * 32


@pytest.fixture(scope="module")
def probe_root(root):  # noqa: F811
    """Probes in the allowed root: one at a reserved layer, one at a layer nothing captures."""
    g = torch.Generator().manual_seed(21)
    made = {}
    for name, layer, labels in (("p", LAYER, ("yes",)), ("q", OTHER_LAYER, ("a", "b")), ("far", 1, ("z",))):
        weight, bias = torch.randn(len(labels), D, generator=g), torch.randn(len(labels), generator=g)
        save_probe(root / "probes" / name, ProbeMeta(layer, labels, "sigmoid", 4), weight, bias)
        made[name] = (root / "probes" / name, weight, bias)
    return made


def command(st, action: str, pid: str, path=None, revision: str = "r1"):
    source = None if path is None else {"id": pid, "path": str(path)}
    return st.runtime_loads.command(LoadCommand(action, "probe", pid, revision, source).signed())


def step(st, wire: str, tokens: int = 3, req_id: str = "a") -> dict[int, torch.Tensor]:
    """One prefill of `tokens` rows for request `req_id` through the op at both reserved layers; the residual
    the next layer reads, by layer."""
    st.prepare(BatchView([req_id], np.array([0, tokens]), np.array([0]), np.array([tokens]), [wire]))
    after = {}
    g = torch.Generator().manual_seed(5)
    for layer in (LAYER, OTHER_LAYER):
        hidden, residual = torch.randn(tokens, D, generator=g), torch.randn(tokens, D, generator=g)
        after[layer] = hidden + torch.ops.steer_plugin.steer_residual(hidden, residual, layer)
    st.after_forward()
    return after


def test_a_runtime_probe_scores_by_its_file_and_stops_when_unloaded(
    root,  # noqa: F811
    probe_root,
    tmp_path,
    monkeypatch,
    mailroom,
):
    monkeypatch.setattr(steer_op, "_capturing", lambda: False)
    st = make_steerer(make_config(root))
    try:
        outcome = command(st, "load", "q", probe_root["q"][0])
        assert outcome.ok and outcome.owned and outcome.layer == OTHER_LAYER and outcome.rows == 2
        assert command(st, "load", "q", probe_root["q"][0], "r2").status == 409  # already loaded
        wire = RequestPlan.build([], observe=mailroom.plan(CID, (), 1, True, probes=("q",))).encode()
        after = step(st, wire)
        records = [r for r in mailroom.read(CID) if isinstance(r, ProbeRecord)]
        _, weight, bias = probe_root["q"]
        tokens = [token for r in records for token in r.tokens()]
        assert [pos for pos, _ in tokens] == [0, 1, 2]
        for pos, found in tokens:
            x = after[OTHER_LAYER][pos]
            want = [torch.sigmoid(weight[c] @ x + bias[c]) for c in range(2)]  # written out per class
            assert list(found) == ["q"] and np.allclose(found["q"], [float(w) for w in want], atol=1e-5)
        # Unloaded while the request (its observation cached by the worker) still runs: no scores, no error.
        assert command(st, "unload", "q").ok and "q" not in st.prober.probes
        assert OTHER_LAYER not in st.prober.layers
        errors = st.step_errors
        step(st, wire)
        assert st.step_errors == errors
        assert not mailroom.read(CID)[len(records) :]
        assert command(st, "unload", "q").owned is False  # gone: nothing to do
    finally:
        steer_op.LAYERS.clear()


def test_a_worker_refuses_a_configured_probe_unload_and_skips_layers_it_does_not_capture(
    root,  # noqa: F811
    probe_root,
    tmp_path,
    monkeypatch,
):
    config = make_config(root)
    config = parse_config(
        {**config.model_dump(exclude_defaults=True), "probes": [{"id": "p", "path": str(probe_root["p"][0])}]}
    )
    st = make_steerer(config)
    try:
        assert command(st, "unload", "p").status == 409
        far = command(st, "load", "far", probe_root["far"][0])
        assert far.ok and not far.owned and "far" not in st.prober.probes
    finally:
        steer_op.LAYERS.clear()


def test_admin_loads_a_probe_on_every_worker_and_names_it(root, probe_root, tmp_path, monkeypatch):  # noqa: F811
    service, workers, broadcast = admin_setup(root, monkeypatch, tmp_path)
    admin = service.admin
    try:
        described = asyncio.run(admin.load("probe", {"id": "q", "path": str(probe_root["q"][0])}, broadcast))
        assert (
            described["layer"] == OTHER_LAYER and described["labels"] == ["a", "b"] and described["revision"]
        )
        assert all("q" in w.prober.probes for w in workers)
        assert service.catalog.probes["q"].labels == ("a", "b")
        assert [p["id"] for p in service.discovery.list_saes()["probes"]] == ["q"]
        request = service.rewrite_request(
            {"prompt": "x", "steering": {"inspect": {"saes": [], "probes": ["q"]}}}
        )
        with service.holding(request):
            with pytest.raises(SpecError) as err:
                asyncio.run(admin.unload("probe", "q", broadcast))
            assert err.value.status == 409 and "in use by 1" in str(err.value)
        assert asyncio.run(admin.unload("probe", "q", broadcast))["deleted"]
        assert not any("q" in w.prober.probes for w in workers) and "q" not in service.catalog.probes
        with pytest.raises(SpecError) as err:
            service.rewrite_request({"prompt": "x", "steering": {"inspect": {"saes": [], "probes": ["q"]}}})
        assert err.value.path == "steering.inspect.probes[0]"
    finally:
        steer_op.LAYERS.clear()


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"id": "far", "path": "PROBES/far"}, 400, "layer"),  # layer 1: no SAE, no probe, not reserved
        ({"id": "p", "path": "PROBES/p", "layer": 2}, 400, "layer"),  # the layer is the file's, not a field
        ({"id": "p"}, 400, "path"),
        ({"id": "p", "path": "/etc"}, 403, "path"),
        ({"id": "p", "path": "PROBES/missing"}, 400, "path"),
        ({"id": "bad id!", "path": "PROBES/p"}, 400, "id"),
        ("not an object", 400, "body"),
    ],
)
def test_admin_probe_load_errors_name_the_field(root, probe_root, tmp_path, monkeypatch, body, status, param):  # noqa: F811
    service, workers, broadcast = admin_setup(root, monkeypatch, tmp_path, workers=1)
    if isinstance(body, dict):
        body = {
            k: v.replace("PROBES", str(root / "probes")) if isinstance(v, str) else v for k, v in body.items()
        }
    try:
        with pytest.raises(SpecError) as err:
            asyncio.run(service.admin.load("probe", body, broadcast))
        assert (err.value.status, err.value.path) == (status, param)
        assert not workers[0].prober.probes  # nothing reached a worker
    finally:
        steer_op.LAYERS.clear()


def test_admin_probe_ids_are_unique_and_unknown_unloads_are_404(root, probe_root, tmp_path, monkeypatch):  # noqa: F811
    service, _, broadcast = admin_setup(root, monkeypatch, tmp_path, workers=1)
    admin = service.admin
    try:
        asyncio.run(admin.load("probe", {"id": "p", "path": str(probe_root["p"][0])}, broadcast))
        with pytest.raises(SpecError) as err:
            asyncio.run(admin.load("probe", {"id": "p", "path": str(probe_root["q"][0])}, broadcast))
        assert (err.value.status, err.value.path) == (409, "id")
        with pytest.raises(SpecError) as err:
            asyncio.run(admin.unload("probe", "nope", broadcast))
        assert err.value.status == 404
    finally:
        steer_op.LAYERS.clear()


def test_a_runtime_probe_of_a_runtime_sae_scores_its_features_and_holds_its_unload(
    root,  # noqa: F811
    tmp_path,
    monkeypatch,
    mailroom,
):
    """Loaded at runtime through the Admin: an SAE, then a probe of its features (scored in the workers by
    act(W·relu(x·W_enc + b_enc) + b) from the SAE's own file); a probe naming an SAE that is not loaded is a 400;
    the SAE cannot be unloaded while the probe reads it (409 naming the probe), and can once the probe is gone."""
    from safetensors.torch import load_file

    from .test_runtime_loads import D_SAE

    service, steerers, broadcast = admin_setup(root, monkeypatch, tmp_path, workers=1)
    admin = service.admin
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(1, D_SAE, generator=g), torch.randn(1, generator=g)
    save_probe(root / "probes" / "feat_t", ProbeMeta(LAYER, ("on",), sae="t"), weight, bias)
    save_probe(root / "probes" / "feat_x", ProbeMeta(LAYER, ("on",), sae="x"), weight, bias)
    try:
        asyncio.run(admin.load("sae", {"id": "t", "path": str(root / "t")}, broadcast))
        with pytest.raises(SpecError, match="`sae` 'x' is not a loaded SAE") as err:
            asyncio.run(admin.load("probe", {"id": "fx", "path": str(root / "probes" / "feat_x")}, broadcast))
        assert err.value.status == 400
        asyncio.run(admin.load("probe", {"id": "ft", "path": str(root / "probes" / "feat_t")}, broadcast))
        monkeypatch.setattr(steer_op, "_capturing", lambda: False)
        wire = RequestPlan.build([], observe=mailroom.plan(CID, (), 1, True, probes=("ft",))).encode()
        after = step(steerers[0], wire)
        sae = load_file(str(root / "t" / "sae_weights.safetensors"))
        features = torch.relu(after[LAYER] @ sae["W_enc"] + sae["b_enc"])  # [3, D_SAE]
        records = [r for r in mailroom.read(CID) if isinstance(r, ProbeRecord)]
        scores = [s["ft"] for r in records for _, s in r.tokens()]
        want = torch.sigmoid(features @ weight.T + bias)  # [3, 1]
        assert torch.allclose(torch.tensor(scores), want, atol=1e-5)
        with pytest.raises(SpecError, match=r"probe\(s\) \['ft'\] read SAE 't'") as err:
            asyncio.run(admin.unload("sae", "t", broadcast))
        assert err.value.status == 409
        asyncio.run(admin.unload("probe", "ft", broadcast))
        assert asyncio.run(admin.unload("sae", "t", broadcast))["deleted"]
    finally:
        steer_op.LAYERS.clear()
