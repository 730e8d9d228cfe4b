"""The messages between the API process and the workers (steer_plugin.messages): typed on both sides, plain
dicts on the wire. vLLM carries collective_rpc results back to the API process as msgpack (msgspec), where a
NamedTuple would become a list and a dataclass a dict: each message must come back whole from its wire dict."""

from __future__ import annotations

import dataclasses

import pytest

from steer_plugin import signing
from steer_plugin.messages import HistogramCounts, LoadCommand, LoadOutcome, WorkerStats


def through_msgpack(wire: dict) -> dict:
    """What vLLM's msgpack makes of a plain result (strict: no pickle fallback for other types)."""
    msgpack = pytest.importorskip("msgspec").msgpack
    return msgpack.decode(msgpack.encode(wire))


def full_stats() -> WorkerStats:
    return WorkerStats(
        steered_tokens={"add": 3, "clamp": 1},
        features_applied={"s": 2},
        op_seconds=0.5,
        sae_bytes={"s": 4096},
        bank_bytes=8192,
        rejected_messages={"steering": 1, "capacity": 2},
        step_errors=4,
        pp_rank=1,
        tp_rank=2,
        l0={"s": HistogramCounts(buckets=[1.0, 2.0], counts=[1, 0, 3], sum=7.0)},
        reconstruction_error={"s": HistogramCounts(buckets=[0.1], counts=[2, 0], sum=0.15)},
        tokens_observed=4,
    )


def test_worker_stats_cross_the_wire_whole():
    stats = full_stats()
    back = WorkerStats.from_wire(through_msgpack(stats.wire()))
    assert back == stats
    assert back.rejected_messages["capacity"] == 2 and back.tp_rank == 2
    assert back.l0["s"].counts == [1, 0, 3] and isinstance(back.l0["s"], HistogramCounts)
    assert (
        WorkerStats.from_wire(stats) is stats
    )  # already typed (VLLM_ALLOW_INSECURE_SERIALIZATION keeps types)


def test_the_wire_names_every_field():
    """A renamed field changes the wire's keys, and an unknown key is refused (both sides run the same code)."""
    assert set(full_stats().wire()) == {f.name for f in dataclasses.fields(WorkerStats)}
    assert set(full_stats().wire()["l0"]["s"]) == {"buckets", "counts", "sum"}
    with pytest.raises(TypeError):
        WorkerStats.from_wire({"ranks": {"tp": 0}})
    with pytest.raises(TypeError):
        LoadOutcome.from_wire({"ok": True, "echo": "x"})


def test_load_outcomes_cross_the_wire_whole():
    outcome = LoadOutcome(ok=False, owned=True, status=507, error="full", layer=3, rows=0, field="layer")
    wire = outcome.wire()
    assert type(wire) is dict and wire["status"] == 507
    assert LoadOutcome.from_wire(through_msgpack(wire)) == outcome
    assert LoadOutcome.from_wire({"ok": True}) == LoadOutcome(ok=True, owned=False, status=200, field="path")


def test_load_commands_are_signed_typed_and_cross_the_wire_whole():
    command = LoadCommand(action="stage", kind="sae", id="t", revision="r1", source={"id": "t", "path": "/x"})
    signed = command.signed()
    assert isinstance(signed, LoadCommand) and signed.mac and signed._replace(mac="") == command
    back = LoadCommand.from_wire(through_msgpack(signed.wire()))
    assert back == signed and back.verified() == signed
    with pytest.raises(signing.SignatureError):
        back._replace(id="other").verified()
    with pytest.raises(TypeError):
        LoadCommand.from_wire({"action": "unload", "kind": "sae"})  # no id
