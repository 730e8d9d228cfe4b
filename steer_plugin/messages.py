"""The messages between the API process and the workers, typed on both sides.

Both sides import this module: the API process (admin.py, metrics.py, steer_adapters/vllm/api/) and the workers
(steer_plugin/engine/, steer_adapters/vllm/worker/). It imports nothing of steer_plugin.engine, so the API
process never loads the engine to read a message (tests/test_import_boundary.py).

They cross vLLM's collective_rpc, whose results travel from the engine core to the API process as msgpack
(vllm/v1/serial_utils.py): a NamedTuple would arrive as a list and a dataclass as a dict, unless the server runs
with VLLM_ALLOW_INSECURE_SERIALIZATION. So each message crosses as its `wire()` dict of plain types (str keys,
bool, int, float, str, lists, dicts of those) and is rebuilt with `from_wire` at the other end: the worker
extension sends wires, api/engine.EngineWorkers rebuilds them, and everything on either side of that seam holds
the typed message.

- LoadCommand: API -> every worker, a runtime load or unload, or a read of what is loaded (signed).
- LoadOutcome: every worker -> API, its answer to one LoadCommand; after a load, an unload or a read, with the
  worker's registry of runtime loads (RuntimeEntry, one per source) and its generation: what every API process
  builds its catalog from (steer_plugin/catalog_sync.py).
- WorkerStats: every worker -> API, its cumulative figures for /metrics (Steerer.stats()); the API merges them
  (metrics._merge) into one WorkerStats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from steer_plugin import signing

ACTIONS = ("stage", "poll", "load", "discard", "unload", "catalog")


class LoadCommand(NamedTuple):
    """What the API process asks every worker to do (crosses as `wire()`; `from_wire` rebuilds it)."""

    action: (
        str  # stage (read the files in the background), poll, load (commit), discard, unload, catalog (read)
    )
    kind: str  # "sae", "vector" or "probe" ("" for catalog)
    id: str
    revision: str = ""  # stage/load: the revision requests will name; unload: the one to unload ("": any)
    source: dict | None = None  # stage/load: SAESource / VectorSource / ProbeSource fields
    mac: str = ""  # the server's signature over the other fields (signed())

    def _payload(self) -> str:
        return json.dumps([self.action, self.kind, self.id, self.revision, self.source], sort_keys=True)

    def signed(self) -> LoadCommand:
        """The command signed with the server's key (what the workers accept)."""
        return self._replace(mac=signing.sign(self._payload()))

    def verified(self) -> LoadCommand:
        """Itself, if its signature is the server's (signing.SignatureError otherwise)."""
        if signing.verify(self.mac) != self._payload():
            raise signing.SignatureError("load command does not match its signature")
        return self

    def wire(self) -> dict:
        return self._asdict()

    @classmethod
    def from_wire(cls, raw: LoadCommand | dict) -> LoadCommand:
        """The command a wire dict carries (TypeError for unknown or missing fields)."""
        return raw if isinstance(raw, cls) else cls(**raw)


class RuntimeEntry(NamedTuple):
    """One source loaded at runtime, as the workers' registry holds it: enough for an API process to read its
    header and name it (the load's `revision`)."""

    kind: str  # "sae", "vector" or "probe"
    id: str
    revision: str
    source: dict  # the SAESource / VectorSource / ProbeSource fields the load was given (real paths)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.kind, self.id, self.revision

    @classmethod
    def from_wire(cls, raw: RuntimeEntry | dict) -> RuntimeEntry:
        return raw if isinstance(raw, cls) else cls(**raw)


class LoadOutcome(NamedTuple):
    """One worker's answer to a LoadCommand (crosses as `wire()`; `from_wire` rebuilds it)."""

    ok: bool
    owned: bool = False  # this worker holds the layer (pipeline ranks own some layers only)
    status: int = 200  # on failure: the HTTP status the API should answer with
    error: str = ""
    layer: int = -1
    rows: int = 0  # bank rows written (a probe: its classes)
    pending: bool = False  # stage/poll: the files are still being read
    field: str = "path"  # on failure: the request field at fault
    # load, unload, catalog: the worker's registry after the command (every runtime load, in load order) and
    # its generation (load and unload commands run so far: the same on every worker); -1: not sent.
    generation: int = -1
    entries: tuple[RuntimeEntry, ...] = ()

    def wire(self) -> dict:
        return {**self._asdict(), "entries": [e._asdict() for e in self.entries]}

    @classmethod
    def from_wire(cls, raw: LoadOutcome | dict) -> LoadOutcome:
        if isinstance(raw, cls):
            return raw
        values = dict(raw)
        values["entries"] = tuple(RuntimeEntry.from_wire(e) for e in values.get("entries", ()))
        return cls(**values)


class HistogramCounts(NamedTuple):
    """One SAE's histogram of an observed-token figure: counts per bucket (the last one: above every bound)."""

    buckets: list[float]  # upper bounds
    counts: list[int]  # len(buckets) + 1
    sum: float

    def wire(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_wire(cls, raw: HistogramCounts | dict) -> HistogramCounts:
        return raw if isinstance(raw, cls) else cls(**raw)


_HISTOGRAM_FIELDS = ("l0", "reconstruction_error")


@dataclass
class WorkerStats:
    """A worker's cumulative figures, pulled by the API process for /metrics (Steerer.stats()); also what
    metrics._merge makes of every worker's (pipeline stages summed)."""

    steered_tokens: dict[str, int] = field(default_factory=dict)  # op -> token-operation pairs
    features_applied: dict[str, int] = field(default_factory=dict)  # SAE -> feature operations compiled
    op_seconds: float = 0.0  # host time in the op (eager executions)
    sae_bytes: dict[str, int] = field(default_factory=dict)  # SAE -> device bytes of its encoder and decoder
    bank_bytes: int = 0
    rejected_messages: dict[str, int] = field(default_factory=dict)  # kind -> messages dropped
    step_errors: int = 0  # steps that ran unsteered after a steering or observation error
    pp_rank: int = 0
    tp_rank: int = 0
    l0: dict[str, HistogramCounts] = field(default_factory=dict)  # SAE -> active features per observed token
    reconstruction_error: dict[str, HistogramCounts] = field(default_factory=dict)  # SAE -> |x-x̂|²/|x|²
    tokens_observed: int = 0
    observation_dropped: int = 0  # records whose message could not be queued (monitor/transport.py)

    def wire(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("steered_tokens", "features_applied", "sae_bytes", "rejected_messages"):
            out[name] = dict(out[name])
        for name in _HISTOGRAM_FIELDS:
            out[name] = {sae: h.wire() for sae, h in out[name].items()}
        return out

    @classmethod
    def from_wire(cls, raw: WorkerStats | dict) -> WorkerStats:
        """The figures a wire dict carries (TypeError for unknown fields)."""
        if isinstance(raw, cls):
            return raw
        values = dict(raw)
        for name in _HISTOGRAM_FIELDS:
            if name in values:
                values[name] = {sae: HistogramCounts.from_wire(h) for sae, h in values[name].items()}
        return cls(**values)
