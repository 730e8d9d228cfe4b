"""Several API server processes over one set of workers (`--api-server-count N`): each process is a
SteeringService of its own (its catalog, in-flight counts, admin), all reaching the same real Steerers through
the wire, as vLLM's collective_rpc carries each process's calls to the one engine core. The workers' registry
is the one record (engine/load_registry.py); each process's catalog is a copy read from it
(catalog_sync.py)."""

from __future__ import annotations

import asyncio

import pytest

from steer_plugin.catalog_sync import Link
from steer_plugin.engine import op as steer_op
from steer_plugin.messages import LoadCommand, LoadOutcome
from steer_plugin.request.schema import SpecError
from steer_plugin.service import SteeringService

from .test_runtime_loads import admin_setup, one_request, root  # noqa: F401

FEATURE = {"features": [{"sae": "t", "index": 1, "value": 1.0}]}


class Processes:
    """Two API processes (a, b) over the same workers, counting the registry reads each sends."""

    def __init__(self, folder, monkeypatch, tmp_path, workers: int = 2):
        self.a, self.workers, self.broadcast = admin_setup(folder, monkeypatch, tmp_path, workers=workers)
        self.b = SteeringService(self.a.config)
        self.root = folder
        self.reads = 0

    async def counted(self, command: LoadCommand) -> list[LoadOutcome]:
        self.reads += command.action == "catalog"
        return await self.broadcast(command)

    @property
    def link(self) -> Link:
        return Link(self.counted, shared=True)

    def request(self, service: SteeringService, steering: dict):
        return asyncio.run(service.rewrite_current({"prompt": "x", "steering": steering}, self.link))

    def load(self, service: SteeringService, sid: str = "t", folder: str = "t") -> dict:
        body = {"id": sid, "path": str(self.root / folder)}
        return asyncio.run(service.admin.load("sae", body, self.counted))


@pytest.fixture
def procs(root, monkeypatch, tmp_path):  # noqa: F811 (the fixture imported above)
    processes = Processes(root, monkeypatch, tmp_path)
    yield processes
    steer_op.LAYERS.clear()


def listed(service: SteeringService) -> tuple[int, list[tuple[str, str | None]]]:
    answer = service.discovery.list_saes()
    return answer["generation"], [(s["id"], s["revision"]) for s in answer["data"]]


def test_what_one_process_loads_the_other_names_once_it_reads_the_registry(procs, monkeypatch):
    revision = procs.load(procs.a)["revision"]
    assert "t" not in procs.b.catalog.saes  # nothing told b
    reads = []
    original = procs.b.admin._read_entry
    monkeypatch.setattr(procs.b.admin.sync, "_read", lambda *a: reads.append(a[0]) or original(*a))
    procs.reads = 0
    request = procs.request(procs.b, FEATURE)  # an id b does not know: one read, planned again
    assert request.ops[0].revision == revision and procs.reads == 1
    assert listed(procs.b) == listed(procs.a) == (1, [("s", None), ("t", revision)])
    procs.request(procs.b, FEATURE)  # a runtime source: read again, nothing new to parse
    assert procs.reads == 2 and reads == ["sae"]  # the SAE's header read once in b


def test_one_id_through_two_processes_loads_once(procs):
    async def both():
        body = {"id": "t", "path": str(procs.root / "t")}
        return await asyncio.gather(
            procs.a.admin.load("sae", body, procs.counted),
            procs.b.admin.load("sae", dict(body), procs.counted),
            return_exceptions=True,
        )

    results = asyncio.run(both())
    errors = [r for r in results if isinstance(r, SpecError)]
    assert len(errors) == 1 and errors[0].status == 409 and errors[0].path == "id"
    assert "being loaded" in str(errors[0])
    with pytest.raises(SpecError) as err:  # loaded since: refused by the registry, whoever asks
        procs.load(procs.b)
    assert err.value.status == 409 and "already loaded" in str(err.value)
    with pytest.raises(SpecError) as err:  # also under another path and layer
        procs.load(procs.a, folder="u3")
    assert err.value.status == 409
    assert {w.runtime_loads.registry.generation for w in procs.workers} == {1}
    assert listed(procs.a) == listed(procs.b)


def test_requests_follow_an_unload_and_a_reload_through_the_other_process(procs):
    first = procs.load(procs.a)["revision"]
    assert procs.request(procs.b, FEATURE).ops[0].revision == first
    assert asyncio.run(procs.a.admin.unload("sae", "t", procs.counted))["deleted"]
    with pytest.raises(SpecError) as err:  # b's copy named t: read again, then refused like any unknown id
        procs.request(procs.b, FEATURE)
    assert err.value.path == "steering.features[0].sae"
    second = procs.load(procs.a)["revision"]
    assert second != first and procs.request(procs.b, FEATURE).ops[0].revision == second
    assert asyncio.run(procs.b.admin.unload("sae", "t", procs.counted))["revision"] == second
    asyncio.run(procs.a.current(procs.link))
    assert listed(procs.a) == listed(procs.b) == (4, [("s", None)])


def test_an_unload_never_takes_a_revision_it_did_not_see(procs):
    first = procs.load(procs.a)["revision"]
    stale = LoadCommand("unload", "sae", "t", "not-" + first).signed()
    outcomes = asyncio.run(procs.broadcast(stale))
    assert {(o.ok, o.status) for o in outcomes} == {(False, 409)}
    assert all(w.assets.saes["t"].revision == first for w in procs.workers)


def test_another_process_requests_do_not_hold_an_unload_and_never_read_other_rows(procs):
    """The in-flight counts are per process: b's running request does not refuse a's unload; the workers then
    run it unsteered (its revision is gone), whatever is loaded into the rows afterwards."""
    procs.load(procs.a)
    request = procs.request(procs.b, FEATURE)
    with procs.b.holding(request):
        assert asyncio.run(procs.a.admin.unload("sae", "t", procs.counted))["deleted"]
        procs.load(procs.a, folder="u")  # the same id, other weights, into the freed rows
        worker = procs.workers[-1]
        one_request(worker, request.plan.encode(), "b-request")
        assert worker.rejected_messages == {"steering": 1} and worker.requests.compiled("b-request") == {}
    with procs.a.holding(procs.request(procs.a, FEATURE)), pytest.raises(SpecError) as err:
        asyncio.run(procs.a.admin.unload("sae", "t", procs.counted))  # a's own request holds it
    assert err.value.status == 409


def test_a_burst_of_requests_shares_one_read(procs):
    procs.load(procs.a)
    procs.reads = 0

    async def burst():
        body = {"prompt": "x", "steering": FEATURE}
        return await asyncio.gather(*(procs.b.rewrite_current(dict(body), procs.link) for _ in range(20)))

    assert len(asyncio.run(burst())) == 20 and procs.reads <= 2


def test_one_api_process_reads_nothing_per_request(procs):
    procs.load(procs.a)
    procs.reads = 0
    single = Link(procs.counted, shared=False)
    body = {"prompt": "x", "steering": FEATURE}
    assert asyncio.run(procs.a.rewrite_current(body, single)).ops[0].revision
    assert asyncio.run(procs.a.current(single)) is False and procs.reads == 0
