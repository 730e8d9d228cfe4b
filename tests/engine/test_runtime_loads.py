"""Runtime loads in a real Steerer and through the API-side Admin: SAEs and vectors written into reserved
bank rows while serving, checked against the formula written out from the files; capacity, revisions,
unloads that wait for the rows to be free, and the admin checks (key, roots, pickles, in-flight refusal,
rollback when one worker fails). The workers' transport (vLLM's collective_rpc) is replaced by calling each
worker's command handler in-process."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steer_plugin.config import parse_config
from steer_plugin.engine import op as steer_op
from steer_plugin.engine.steerer import BatchView, Steerer
from steer_plugin.messages import LoadCommand, LoadOutcome
from steer_plugin.request.resolve import resolve_spec
from steer_plugin.request.schema import SpecError, parse_spec
from steer_plugin.request.wire import RequestPlan
from steer_plugin.service import SteeringService

D, D_SAE, LAYER, OTHER_LAYER, MAX_TOKENS, MAX_SEQS = 16, 48, 2, 3, 64, 8
KEY = "k" * 32


def write_sae(folder: Path, seed: int, layer: int = LAYER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    cfg = {
        "d_in": D,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "architecture": "standard",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post", "sae_lens_version": "6.5.0"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {
            "W_enc": torch.randn(D, D_SAE, generator=g) * 0.3,
            "W_dec": torch.randn(D_SAE, D, generator=g) * 0.3,
            "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
            "b_dec": torch.randn(D, generator=g) * 0.1,
        },
        str(folder / "sae_weights.safetensors"),
    )
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The allowed root: a configured SAE `s`, two more SAEs and a vector to load at runtime."""
    folder = tmp_path_factory.mktemp("runtime-root")
    write_sae(folder / "s", seed=0)
    write_sae(folder / "t", seed=1)
    write_sae(folder / "u", seed=2)
    write_sae(folder / "u3", seed=2, layer=OTHER_LAYER)
    save_file(
        {"v": torch.randn(D, generator=torch.Generator().manual_seed(3))}, str(folder / "vec.safetensors")
    )
    return folder


def make_config(root: Path, rows: int = D_SAE + 2, policy: dict | None = None, **runtime):
    return parse_config(
        {
            "saes": [{"id": "s", "path": str(root / "s")}],
            "policy": policy or {},
            "runtime": {
                "layers": [LAYER, OTHER_LAYER],
                "rows_per_layer": rows,
                "roots": [str(root)],
                "admin_key": KEY,
                **runtime,
            },
        }
    )


def make_steerer(config) -> Steerer:
    st = Steerer(config, range(4), torch.device("cpu"), torch.float32, MAX_TOKENS, D, max_seqs=MAX_SEQS)
    st.activate()
    return st


@pytest.fixture
def worker(root, tmp_path, monkeypatch):
    st = make_steerer(make_config(root))
    yield st
    steer_op.LAYERS.clear()


def load(st: Steerer, kind: str, sid: str, source: dict, revision: str = "r1") -> LoadOutcome:
    command = LoadCommand("load", kind, sid, revision, {"id": sid, **source})
    return st.runtime_loads.command(command.signed())  # signed as the admin API signs it


def unload(st: Steerer, kind: str, sid: str) -> LoadOutcome:
    return st.runtime_loads.command(LoadCommand("unload", kind, sid).signed())


def run_op(x_hidden, residual, capturing: bool, monkeypatch, layer: int = LAYER):
    monkeypatch.setattr(steer_op, "_capturing", lambda: capturing)
    return torch.ops.steer_plugin.steer_residual(x_hidden, residual, layer)


def wire_for(catalog, steering: dict) -> str:
    return RequestPlan.build(resolve_spec(parse_spec(steering), catalog)).encode()


def one_request(st: Steerer, wire: str | None, req_id: str = "a", tokens: int = 3) -> None:
    view = BatchView([req_id], np.array([0, tokens]), np.array([0]), np.array([tokens]), [wire])
    st.prepare(view)


def service_for(config, st: Steerer) -> SteeringService:
    """The API side over the same config, its catalog told about what the worker loaded."""
    service = SteeringService(config)
    loaded = [s for s in [*st.assets.saes.values(), *st.assets.vectors.values()] if s.revision]
    service.set_runtime_sources(loaded, st.runtime_loads.registry.generation)
    return service


def test_a_runtime_sae_clamps_and_adds_by_the_formula_from_its_file(worker, root, monkeypatch):
    """Clamp t/7 to 2.0 and add 1.5 x t/9 at once, with t loaded while serving: x + (2 - f_7(x)) W_dec[7]
    + 1.5 W_dec[9], f_7 written out from t's file (ReLU SAE), on both op paths."""
    outcome = load(worker, "sae", "t", {"path": str(root / "t")})
    assert outcome.ok and outcome.owned and outcome.rows == D_SAE
    w = load_file(str(root / "t" / "sae_weights.safetensors"))
    service = service_for(worker.config, worker)
    steering = {
        "features": [
            {"sae": "t", "index": 7, "op": "clamp", "value": 2.0},
            {"sae": "t", "index": 9, "value": 1.5},
        ]
    }
    one_request(worker, wire_for(service.catalog, steering))
    g = torch.Generator().manual_seed(5)
    hidden, residual = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    x = hidden + residual
    f7 = torch.relu(x @ w["W_enc"][:, 7] + w["b_enc"][7])
    expected = residual + (2.0 - f7)[:, None] * w["W_dec"][7] + 1.5 * w["W_dec"][9]
    expected[3] = residual[3]  # row 3 belongs to no request
    for capturing in (False, True):
        out = run_op(hidden, residual, capturing, monkeypatch)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[3], residual[3])


def test_runtime_and_configured_copies_of_one_sae_steer_identically(worker, root, monkeypatch):
    load(worker, "sae", "s_again", {"path": str(root / "s")})
    service = service_for(worker.config, worker)
    g = torch.Generator().manual_seed(6)
    hidden, residual = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    outs = []
    for sid in ("s", "s_again"):
        worker.clear()
        one_request(
            worker,
            wire_for(service.catalog, {"features": [{"sae": sid, "index": 4, "op": "clamp", "value": 1.0}]}),
            sid,
        )
        outs.append(run_op(hidden, residual, False, monkeypatch))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], residual)


def test_a_vector_at_a_layer_with_nothing_configured(worker, root, monkeypatch):
    """OTHER_LAYER has no configured SAE or vector: the op runs there only because it is reserved."""
    outcome = load(worker, "vector", "v", {"path": str(root / "vec.safetensors"), "layer": OTHER_LAYER})
    assert outcome.ok and outcome.layer == OTHER_LAYER
    service = service_for(worker.config, worker)
    one_request(worker, wire_for(service.catalog, {"vectors": [{"name": "v", "scale": -2.0}]}))
    vec = load_file(str(root / "vec.safetensors"))["v"]
    hidden, residual = torch.randn(3, D), torch.randn(3, D)
    torch.testing.assert_close(
        run_op(hidden, residual, False, monkeypatch, OTHER_LAYER), residual - 2.0 * vec
    )


def test_capacity_layers_and_duplicates_are_refused_with_a_status(worker, root):
    assert load(worker, "sae", "t", {"path": str(root / "t")}).ok
    full = load(worker, "sae", "u", {"path": str(root / "u")})
    assert not full.ok and full.status == 507 and "rows_per_layer" in full.error
    again = load(worker, "sae", "t", {"path": str(root / "t")}, revision="r2")
    assert not again.ok and again.status == 409
    elsewhere = load(worker, "vector", "w", {"path": str(root / "vec.safetensors"), "layer": 1})
    assert not elsewhere.ok and elsewhere.status == 400 and "reserved" in elsewhere.error
    broken = load(worker, "sae", "x", {"path": str(root / "nothing-here")})
    assert not broken.ok and broken.status == 400
    assert unload(worker, "sae", "s").status == 409  # configured at start-up


def test_unload_frees_the_rows_at_once_and_stale_revisions_run_unsteered(worker, root, monkeypatch):
    """Unload t while a request that steered with it still holds a slot (it finished; the worker learns that
    only at the next step): its slot and t's working-set columns go, the rows are zeroed and free at once. A
    reload of another file under the same id into the same rows steers by the new file (no column still holds
    the old rows); a request resolved against the old revision runs unsteered (counted)."""
    load(worker, "sae", "t", {"path": str(root / "t")}, revision="old")
    service = service_for(worker.config, worker)
    old_wire = wire_for(service.catalog, {"features": [{"sae": "t", "index": 7, "value": 3.0}]})
    one_request(worker, old_wire, "a")
    bank, tables = worker.banks[LAYER], worker.tables[LAYER]
    old_offset = bank.entries[("feature", "t")].offset
    assert tables.uses_rows(old_offset, D_SAE)
    assert unload(worker, "sae", "t").ok
    assert "a" not in worker.step.slot_of and not tables.uses_rows(old_offset, D_SAE)
    assert bank.free_reserved_rows() == D_SAE + 2
    assert torch.count_nonzero(bank.dec[old_offset : old_offset + D_SAE]) == 0
    assert load(worker, "sae", "t", {"path": str(root / "u")}, revision="new").ok  # same id, other file
    assert bank.entries[("feature", "t")].offset == old_offset
    service = service_for(worker.config, worker)
    new_wire = wire_for(service.catalog, {"features": [{"sae": "t", "index": 7, "value": 3.0}]})
    hidden, residual = torch.randn(3, D), torch.randn(3, D)
    one_request(worker, new_wire, "b")
    w_new = load_file(str(root / "u" / "sae_weights.safetensors"))
    torch.testing.assert_close(
        run_op(hidden, residual, False, monkeypatch), residual + 3.0 * w_new["W_dec"][7]
    )
    rejected = worker.rejected_messages.get("steering", 0)
    one_request(worker, old_wire, "c")  # resolved against revision "old"
    assert worker.rejected_messages["steering"] == rejected + 1
    assert torch.equal(run_op(hidden, residual, False, monkeypatch), residual)


def test_an_unload_gives_back_the_inline_rows_of_the_requests_it_releases(root, tmp_path, monkeypatch):
    """The slots an unload gives back are released through the steerer, which tells the request table: the
    inline-vector rows those requests held are free at once (not only when their records are pruned)."""
    st = make_steerer(make_config(root, policy={"allow_inline_vectors": True, "max_inline_vectors": 1}))
    try:
        load(st, "sae", "t", {"path": str(root / "t")})
        bank = st.banks[LAYER]
        free_before = len(bank._free_scratch)
        steering = {
            "features": [{"sae": "t", "index": 7, "value": 3.0}],
            "vectors": [{"values": [0.5] * D, "layer": LAYER}],
        }
        one_request(st, wire_for(service_for(st.config, st).catalog, steering), "a")
        assert "a" in st.step.slot_of and len(bank._free_scratch) == free_before - 1
        assert unload(st, "sae", "t").ok  # "a" finished since the last step: its slot goes with t
        assert "a" not in st.step.slot_of and len(bank._free_scratch) == free_before
    finally:
        steer_op.LAYERS.clear()


def admin_setup(root: Path, monkeypatch, tmp_path, workers: int = 2, **runtime):
    config = make_config(root, **runtime)
    steerers = [make_steerer(config) for _ in range(workers)]  # one process, so the op reads the last one
    service = SteeringService(config)

    async def broadcast(
        command: LoadCommand,
    ) -> list[LoadOutcome]:  # through the wire, as collective_rpc carries it
        return [LoadOutcome.from_wire(st.runtime_loads.command(command.wire()).wire()) for st in steerers]

    return service, steerers, broadcast


def test_admin_loads_everywhere_then_names_it_and_rolls_back_a_partial_load(root, tmp_path, monkeypatch):
    service, (w1, w2), broadcast = admin_setup(root, monkeypatch, tmp_path)
    admin = service.admin
    described = asyncio.run(admin.load("sae", {"id": "t", "path": str(root / "t")}, broadcast))
    assert described["revision"] and described["layer"] == LAYER and described["d_sae"] == D_SAE
    assert {w1.assets.saes["t"].revision, w2.assets.saes["t"].revision} == {described["revision"]}
    request = service.rewrite_request(
        {"prompt": "x", "steering": {"features": [{"sae": "t", "index": 1, "value": 1.0}]}}
    )
    assert request.ops[0].revision == described["revision"]
    # Worker 2 has no room for u (w1 does): the load fails with its status and is undone on w1.
    load(w2, "vector", "filler", {"path": str(root / "vec.safetensors"), "layer": OTHER_LAYER})
    load(w2, "sae", "blocker", {"path": str(root / "u3")})
    with pytest.raises(SpecError) as err:
        asyncio.run(admin.load("sae", {"id": "u", "path": str(root / "u3")}, broadcast))
    assert err.value.status == 507
    assert "u" not in w1.assets.saes and "u" not in service.catalog.saes
    assert w1.banks[OTHER_LAYER].free_reserved_rows() == D_SAE + 2
    steer_op.LAYERS.clear()


def test_admin_refuses_unloading_what_running_requests_use(root, tmp_path, monkeypatch):
    service, _, broadcast = admin_setup(root, monkeypatch, tmp_path, workers=1)
    admin = service.admin
    asyncio.run(admin.load("sae", {"id": "t", "path": str(root / "t")}, broadcast))
    request = service.rewrite_request({"prompt": "x", "steering": {"inspect": {"saes": ["t"]}}})
    with service.holding(request):
        with pytest.raises(SpecError) as err:
            asyncio.run(admin.unload("sae", "t", broadcast))
        assert err.value.status == 409 and "in use by 1" in str(err.value)
    assert asyncio.run(admin.unload("sae", "t", broadcast))["deleted"]
    with pytest.raises(SpecError) as err:
        service.rewrite_request(
            {"prompt": "x", "steering": {"features": [{"sae": "t", "index": 1, "value": 1.0}]}}
        )
    assert err.value.path == "steering.features[0].sae"
    with pytest.raises(SpecError) as err:
        asyncio.run(admin.unload("sae", "t", broadcast))
    assert err.value.status == 404
    steer_op.LAYERS.clear()


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"id": "t"}, 400, "path"),
        (
            {
                "id": "t",
                "release": "gemma-scope-2b-pt-res-canonical",
                "sae_id": "layer_2/width_16k/canonical",
            },
            400,
            "release",
        ),
        ({"id": "t", "neuronpedia": "gemma-2-2b/2-gemmascope-res-16k"}, 400, "neuronpedia"),
        ({"id": "bad id!", "path": "ROOT/t"}, 400, "id"),
        ({"id": "t", "path": "ROOT/t", "rows": 3}, 400, "rows"),
        ({"id": "t", "path": "relative/t"}, 400, "path"),
        ({"id": "t", "path": "/etc"}, 403, "path"),
        ({"id": "t", "path": "ROOT/../etc"}, 403, "path"),
        ({"id": "t", "path": "ROOT/link-out"}, 403, "path"),
        ({"id": "t", "path": "ROOT/t", "labels": "/etc/passwd"}, 403, "labels"),
        ({"id": "t", "path": "ROOT/t", "allow_pickle": True}, 403, "allow_pickle"),
        ({"id": "t", "path": "ROOT/t", "layer": 1}, 400, "path"),  # the SAE's own hook says layer 2
        ({"id": "t", "path": "ROOT/missing"}, 400, "path"),
        ({"id": "s", "path": "ROOT/s"}, 409, "id"),
        (["not", "an", "object"], 400, "body"),
    ],
)
def test_admin_load_errors_name_the_field(root, tmp_path, monkeypatch, body, status, param):
    link = root / "link-out"
    if not link.exists():
        link.symlink_to("/etc")
    service, steerers, broadcast = admin_setup(root, monkeypatch, tmp_path, workers=1)
    if isinstance(body, dict):
        body = {k: v.replace("ROOT", str(root)) if isinstance(v, str) else v for k, v in body.items()}
    with pytest.raises(SpecError) as err:
        asyncio.run(service.admin.load("sae", body, broadcast))
    assert (err.value.status, err.value.path) == (status, param)
    assert not any(e.revision for e in steerers[0].banks[LAYER].entries.values())  # nothing reached a worker
    steer_op.LAYERS.clear()


def test_admin_key(root, tmp_path, monkeypatch):
    service, _, _ = admin_setup(root, monkeypatch, tmp_path, workers=1)
    service.admin.check_key(KEY.encode())
    for given in (None, b"", KEY[:-1].encode(), (KEY + "x").encode()):
        with pytest.raises(SpecError) as err:
            service.admin.check_key(given)
        assert err.value.status == 401
    monkeypatch.delenv("STEER_ADMIN_KEY", raising=False)
    config = parse_config({"runtime": {"layers": "any", "rows_per_layer": 4, "roots": [str(root)]}})
    assert SteeringService(config).admin is None  # no key: no admin routes
    monkeypatch.setenv("STEER_ADMIN_KEY", "e" * 20)
    assert SteeringService(config).admin.key == "e" * 20
    steer_op.LAYERS.clear()


def test_the_admin_key_is_not_part_of_the_compile_cache_key(root):
    assert make_config(root).fingerprint() == make_config(root, admin_key="z" * 40).fingerprint()
    assert make_config(root).fingerprint() != make_config(root, rows=D_SAE + 3).fingerprint()


def test_copying_a_root_elsewhere_keeps_paths_inside(root, tmp_path):
    """Roots are compared after resolving links: a root given through a link still admits its files."""
    link = tmp_path / "root-link"
    link.symlink_to(root)
    shutil.copy(root / "vec.safetensors", tmp_path / "outside.safetensors")
    config = parse_config(
        {"runtime": {"layers": [LAYER], "rows_per_layer": 4, "roots": [str(link)], "admin_key": KEY}}
    )
    admin = SteeringService(config).admin
    assert admin._allowed_path("path", str(root / "vec.safetensors")) == str(root / "vec.safetensors")
    with pytest.raises(SpecError):
        admin._allowed_path("path", str(tmp_path / "outside.safetensors"))


def test_the_admin_schema_takes_a_path_and_no_hub_names():
    """Runtime loads refuse SAEs named by release / Neuronpedia (start-up only): /openapi.json says so."""
    from steer_adapters.vllm.api.openapi import add_steering_to_openapi

    schema = add_steering_to_openapi({}, admin=True)["components"]["schemas"]["SAESource"]
    assert "path" in schema["required"] and schema["properties"]["path"].get("description")
    assert not {"release", "sae_id", "neuronpedia", "hub_revision"} & set(schema["properties"])


def test_admin_broken_sae_files_are_400_naming_the_file(root, tmp_path, monkeypatch):
    """The API side reads only headers: a damaged header is refused there; NaN weights behind an intact header
    only by the workers, whose refusal comes back as the same 400 and is rolled back everywhere."""
    bad = tmp_path / "bad"
    bad.mkdir()
    # The workers read files under their own configuration's roots: `bad` is one of them.
    service, steerers, broadcast = admin_setup(root, monkeypatch, tmp_path, roots=[str(root), str(bad)])
    for name, damage in (("cut", "truncate"), ("nan", "nan")):
        folder = write_sae(bad / name, seed=5)
        weights = folder / "sae_weights.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:-64])
        else:
            tensors = load_file(str(weights))
            tensors["W_dec"][3, 1] = float("nan")
            save_file(tensors, str(weights))
        with pytest.raises(SpecError) as err:
            asyncio.run(service.admin.load("sae", {"id": name, "path": str(folder)}, broadcast))
        assert (err.value.status, err.value.path) == (400, "path") and str(weights) in str(err.value)
        assert ("non-finite" if damage == "nan" else "cannot read safetensors file") in str(err.value)
        assert name not in service.catalog.saes and not any(name in st.assets.saes for st in steerers)
    assert all(st.banks[LAYER].free_reserved_rows() == D_SAE + 2 for st in steerers)
    steer_op.LAYERS.clear()


def test_rows_are_free_at_once_after_several_unloads(root, tmp_path, monkeypatch):
    """Two SAEs loaded; a request that steered with the second finished (it still holds its slot until the next
    step). Unloading the first drops every cached plan; unloading the second must still give that slot back (read
    from the tables), so two loads right after both find whole free ranges, no 507."""
    st = make_steerer(make_config(root, rows=2 * D_SAE + 2))
    assert load(st, "sae", "t", {"path": str(root / "t")}, revision="r-t").ok
    assert load(st, "sae", "u", {"path": str(root / "u")}, revision="r-u").ok
    service = service_for(st.config, st)
    one_request(st, wire_for(service.catalog, {"features": [{"sae": "u", "index": 3, "value": 1.0}]}), "a")
    assert unload(st, "sae", "t").ok and unload(st, "sae", "u").ok
    assert "a" not in st.step.slot_of and not st.runtime_loads.retired
    for sid in ("v1", "v2"):
        outcome = load(st, "sae", sid, {"path": str(root / "t")}, revision=f"r-{sid}")
        assert outcome.ok, outcome
    steer_op.LAYERS.clear()


def test_loads_are_read_in_the_background_and_committed_between_steps(worker, root):
    """stage returns at once (the files are read in a thread), poll says when every file is read, load copies
    the rows; an unsigned command (what another process reaching the engine could send) is refused."""
    cmd = LoadCommand("stage", "sae", "t", "r1", {"id": "t", "path": str(root / "t")})
    assert worker.runtime_loads.command(cmd.signed()).pending
    deadline = time.monotonic() + 30
    while (polled := worker.runtime_loads.command(cmd._replace(action="poll").signed())).pending:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert polled.ok and polled.owned and ("feature", "t") not in worker.banks[LAYER].entries
    assert worker.runtime_loads.command(cmd._replace(action="load").signed()).rows == D_SAE
    unsigned = LoadCommand("unload", "sae", "t").wire()  # as collective_rpc would carry it
    refused = worker.runtime_loads.command(unsigned)
    assert not refused.ok and refused.status == 403 and "t" in worker.assets.saes


def test_a_worker_opens_files_under_its_own_roots_only(worker, root, tmp_path):
    """Whatever the command says, the worker reads under runtime.roots of its own configuration (403)."""
    outside = tmp_path / "outside"
    shutil.copytree(root / "t", outside)
    refused = load(worker, "sae", "x", {"path": str(outside)})
    assert not refused.ok and refused.status == 403
    linked = root / "linked-weights"
    linked.mkdir(exist_ok=True)
    for name in ("cfg.json", "sae_weights.safetensors"):
        if not (linked / name).is_symlink():
            (linked / name).symlink_to(outside / name)
    refused = load(worker, "sae", "y", {"path": str(linked)})
    assert not refused.ok and refused.status == 403
