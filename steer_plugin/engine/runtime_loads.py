"""Loading and unloading SAEs, vectors and probes in a running worker (the admin API's worker side).

Each load writes into rows the bank reserved at start-up (runtime.rows_per_layer), so no buffer a compiled
or captured graph reads ever moves; the op reads the working set, which copies bank rows when a request takes
them. An unload retires the entry (no new plan can name it) and gives back the slots that still hold its rows:
the API refuses unloads while running requests use a source, so those are requests that finished since the
last step (the worker learns of that only at the next step). Their working-set columns go with them, so the
rows are free at once and a later load into them can never be confused with the old one. A probe takes no
bank rows: it goes to the ProbeReader (its layer's weights stacked again) at a layer whose residual this
worker captures; unloaded, requests that asked for it just stop getting its scores.

Commands arrive through vLLM's collective_rpc between steps (never during a forward), so nothing slow may run
in them: a load is `stage`d first (the files are read in a background thread of this worker while the engine
keeps stepping; the API `poll`s until every worker is ready), then committed by `load` (rows copied into the
bank). Files are opened under runtime.roots only (steer_plugin.files.confined), from this worker's own
configuration, and a command must carry the server's signature: only the API process's admin routes, which
check the admin key, can load anything. Every outcome is a LoadOutcome (steer_plugin.messages): a broken file never
raises here. Which ids may be staged, committed or unloaded is the registry's rule (load_registry.py: the same
on every worker, the record every API process builds its catalog from); it goes back with every load, unload
and `catalog` read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from steer_plugin import signing
from steer_plugin.catalog import (
    LoadedAssets,
    LoadedProbe,
    LoadedSAE,
    LoadedVector,
    load_probe_source,
    load_sae_source,
    load_vector_source,
)
from steer_plugin.config import ConfigError, ProbeSource, RuntimeConfig, SAESource, VectorSource
from steer_plugin.engine.bank import BankEntry, BankFull, LayerBank, sae_params, vector_params
from steer_plugin.engine.load_registry import LoadRegistry
from steer_plugin.files import confined
from steer_plugin.messages import ACTIONS, LoadCommand, LoadOutcome

if TYPE_CHECKING:
    from steer_plugin.engine.observe import Observer
    from steer_plugin.engine.probing import ProbeReader
    from steer_plugin.engine.step import StepMetadata
    from steer_plugin.engine.tables import LayerTables
    from steer_plugin.sae.model import SparseAutoencoder

logger = logging.getLogger("steer_plugin")


@dataclass(frozen=True)
class LoadTarget:
    """What runtime loads read and change in a worker, handed in by their owner (engine.steerer.Steerer builds
    one over its own objects, which it never rebinds): the banks and tables rows go into, the assets and observer
    that name loaded sources, the slots whose tables name an unloaded source's rows, and three callbacks."""

    runtime: RuntimeConfig | None  # the worker's own runtime section (roots, reserved layers)
    d_model: int
    banks: dict[int, LayerBank]  # layer -> bank, the layers this worker owns
    tables: dict[int, LayerTables]
    assets: LoadedAssets  # saes / vectors by id, edited in place
    observer: Observer
    step: StepMetadata  # its slot_of: request id -> slot (read only)
    # Give these requests' slots back: their rows emptied, the request table told (inline rows free again).
    release_slots: Callable[[list[str]], None]
    sae_view: Callable[[LoadedSAE], SparseAutoencoder]  # the SAE over its bank rows, for the observer
    source_gone: Callable[[str], None]  # an unloaded source's id: drop its figures and every cached plan
    prober: ProbeReader  # probes loaded at runtime go here
    read_layers: frozenset[int]  # layers whose residual this worker captures (a probe may read them)
    configured: frozenset[tuple[str, str]] = frozenset()  # (kind, id) configured at start-up, every layer


KINDS = ("sae", "vector", "probe")


class _Staged(NamedTuple):
    loaded: LoadedSAE | LoadedVector | LoadedProbe


class RuntimeLoads:
    """The worker's runtime loads: which entries are live, which are retired and waiting to be freed, and the
    loads being read in the background."""

    def __init__(self, target: LoadTarget):
        self.target = target
        self.retired: list[tuple[int, BankEntry]] = []  # (layer, entry) whose rows may still be in use
        self._staged: dict[tuple[str, str, str], Future] = {}  # (kind, id, revision) -> its read
        self._reader: ThreadPoolExecutor | None = None
        self.probe_revisions: dict[str, str] = {}  # probes loaded at runtime that this worker holds
        self.registry = LoadRegistry(
            target.configured
        )  # every runtime load, whichever layers this worker owns

    def command(self, raw: LoadCommand | dict) -> LoadOutcome:
        """Run one LoadCommand (or its wire dict, as collective_rpc delivers it); never raises."""
        try:
            cmd = LoadCommand.from_wire(raw).verified()
        except Exception as err:
            return self._failure(err, raw.action if isinstance(raw, LoadCommand) else raw.get("action"))
        try:
            outcome = self._run(cmd)
        except Exception as err:
            outcome = self._failure(err, cmd.action)
        registry = self.registry
        if cmd.action in ("load", "unload"):  # counted whatever the outcome: the same on every worker
            registry.generation += 1
            if outcome.ok:
                (registry.committed if cmd.action == "load" else registry.unloaded)(cmd)
        return registry.stamped(outcome) if cmd.action in ("load", "unload", "catalog") else outcome

    def _run(self, cmd: LoadCommand) -> LoadOutcome:
        if cmd.action not in ACTIONS or (cmd.kind not in KINDS and cmd.action != "catalog"):
            return LoadOutcome(False, status=400, error=f"unknown action {cmd.action!r}")
        if cmd.action == "stage":
            return self.registry.load_refusal(cmd, self._staged) or self._stage(cmd)
        if cmd.action == "poll":
            return self._poll(cmd)
        if cmd.action == "discard":
            future = self._staged.pop(self._key(cmd), None)
            if future is not None:
                future.cancel()
            return LoadOutcome(True)
        if cmd.action == "catalog":
            return LoadOutcome(True)
        if cmd.action == "load":
            return self.registry.load_refusal(cmd, ()) or self._commit(cmd)
        return self.registry.unload_refusal(cmd) or self._unload(cmd)

    @staticmethod
    def _failure(err: Exception, action: object) -> LoadOutcome:
        if isinstance(err, ConfigError):
            return LoadOutcome(False, status=err.status, error=str(err), field=err.field)
        if isinstance(err, BankFull):
            return LoadOutcome(False, status=507, error=str(err), field="layer")
        if isinstance(err, (signing.SignatureError, TypeError)):
            return LoadOutcome(False, status=403, error=f"refused: {err}", field="body")
        logger.exception("steer_plugin: runtime %s failed", action)  # never take the engine down
        return LoadOutcome(False, status=500, error=f"{type(err).__name__}: {err}", field="body")

    @staticmethod
    def _key(cmd: LoadCommand) -> tuple[str, str, str]:
        return cmd.kind, cmd.id, cmd.revision

    # --- reading (a background thread: never inside the engine's step) ---------------------------------------

    def _read(self, cmd: LoadCommand) -> _Staged:
        """The source's files, read under runtime.roots (this worker's own configuration)."""
        target = self.target
        runtime = target.runtime
        if runtime is None:
            raise ConfigError("this server has no `runtime` section: nothing can be loaded", status=403)
        with confined(runtime.roots):
            if cmd.kind == "sae":
                loaded = load_sae_source(
                    SAESource(**cmd.source), "sae", target.d_model, explanations=False, labels=False
                )
            elif cmd.kind == "probe":
                loaded = load_probe_source(
                    ProbeSource(**cmd.source), "probe", target.d_model, saes=target.assets.saes
                )
            else:
                loaded = load_vector_source(VectorSource(**cmd.source), "vector", target.d_model)
        return _Staged(loaded)

    def _stage(self, cmd: LoadCommand) -> LoadOutcome:
        key = self._key(cmd)
        if key not in self._staged:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="steer-plugin-load")
            self._staged[key] = self._reader.submit(self._read, cmd)
        return LoadOutcome(True, pending=True)

    def _poll(self, cmd: LoadCommand) -> LoadOutcome:
        future = self._staged.get(self._key(cmd))
        if future is None:
            return LoadOutcome(
                False, status=409, error=f"{cmd.kind} {cmd.id!r} is not being loaded", field="id"
            )
        if not future.done():
            return LoadOutcome(True, pending=True)
        err = future.exception()
        if err is not None:
            del self._staged[self._key(cmd)]
            return self._failure(err, "load")
        loaded = future.result().loaded
        if cmd.kind == "probe":
            return LoadOutcome(True, owned=loaded.layer in self.target.read_layers, layer=loaded.layer)
        return LoadOutcome(True, owned=self._bank(loaded.layer, cmd.kind) is not None, layer=loaded.layer)

    # --- committing (between steps: only row copies) ---------------------------------------------------------

    def _commit(self, cmd: LoadCommand) -> LoadOutcome:
        future = self._staged.pop(self._key(cmd), None)
        # A load that was not staged reads its files here (offline use and tests; the admin API stages).
        staged = future.result() if future is not None else self._read(cmd)
        if cmd.kind == "sae":
            return self._place_sae(cmd, staged.loaded)
        if cmd.kind == "probe":
            return self._place_probe(cmd, staged.loaded)
        return self._place_vector(cmd, staged.loaded)

    def _bank(self, layer: int, what: str):
        """The layer's bank if this worker owns it (None otherwise); ConfigError without reserved rows."""
        bank = self.target.banks.get(layer)
        config = self.target.runtime
        reserved = config is not None and config.reserves(layer)
        if not reserved:
            raise ConfigError(f"{what}: layer {layer} has no reserved rows (runtime.layers)", field="layer")
        return bank

    def _place_sae(self, cmd: LoadCommand, loaded: LoadedSAE) -> LoadOutcome:
        target = self.target
        bank = self._bank(loaded.layer, "sae")
        if bank is None:
            return LoadOutcome(True, owned=False, layer=loaded.layer)
        sae = loaded.sae
        bank.place("feature", cmd.id, cmd.revision, sae.W_dec.float(), sae.W_enc.t().float(), sae_params(sae))
        target.tables[loaded.layer].bank_rows_changed()
        loaded = loaded._replace(revision=cmd.revision)
        target.assets.saes[cmd.id] = loaded
        target.observer.add(cmd.id, target.sae_view(loaded))
        logger.info(
            "steer_plugin: loaded SAE %s (revision %s, %d features) into layer %d",
            cmd.id,
            cmd.revision,
            sae.d_sae,
            loaded.layer,
        )
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=sae.d_sae)

    def _place_vector(self, cmd: LoadCommand, loaded: LoadedVector) -> LoadOutcome:
        target = self.target
        bank = self._bank(loaded.layer, "vector")
        if bank is None:
            return LoadOutcome(True, owned=False, layer=loaded.layer)
        vec = loaded.vector
        bank.place("vector", cmd.id, cmd.revision, vec[None], torch.zeros(1, vec.numel()), vector_params(vec))
        target.tables[loaded.layer].bank_rows_changed()
        target.assets.vectors[cmd.id] = loaded._replace(revision=cmd.revision)
        logger.info(
            "steer_plugin: loaded vector %s (revision %s) into layer %d", cmd.id, cmd.revision, loaded.layer
        )
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=1)

    def _place_probe(self, cmd: LoadCommand, loaded: LoadedProbe) -> LoadOutcome:
        target = self.target
        if loaded.layer not in target.read_layers:  # another pipeline rank's layer (the API checked the rest)
            return LoadOutcome(True, owned=False, layer=loaded.layer)
        target.prober.add(cmd.id, loaded.probe)
        target.assets.probes[cmd.id] = loaded.probe
        self.probe_revisions[cmd.id] = cmd.revision
        logger.info(
            "steer_plugin: loaded probe %s (revision %s) reading layer %d", cmd.id, cmd.revision, loaded.layer
        )
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=len(loaded.probe.meta.labels))

    def _unload_probe(self, cmd: LoadCommand) -> LoadOutcome:
        target = self.target
        probe = target.prober.probes.get(cmd.id)
        if probe is None:
            return LoadOutcome(True, owned=False)  # another pipeline rank holds it
        revision = self.probe_revisions.pop(cmd.id, "")
        target.prober.remove(cmd.id)
        target.assets.probes.pop(cmd.id, None)
        logger.info("steer_plugin: unloaded probe %s (revision %s)", cmd.id, revision)
        return LoadOutcome(True, owned=True, layer=probe.meta.layer)

    def _unload(self, cmd: LoadCommand) -> LoadOutcome:
        if cmd.kind == "probe":
            return self._unload_probe(cmd)
        target = self.target
        kind = "feature" if cmd.kind == "sae" else "vector"
        assets = target.assets.saes if cmd.kind == "sae" else target.assets.vectors
        loaded = assets.get(cmd.id)
        if loaded is None:
            return LoadOutcome(True, owned=False)  # another pipeline rank holds it
        entry = target.banks[loaded.layer].retire(kind, cmd.id)
        del assets[cmd.id]
        if cmd.kind == "sae":
            target.observer.remove(cmd.id)
        self._release_slots_using(loaded.layer, entry)
        # Its metric series goes with it; cached plans name bank rows: a request that comes back compiles afresh
        # (and finds no such source).
        target.source_gone(cmd.id)
        self.retired.append((loaded.layer, entry))
        self.release_retired()
        if self.retired:  # a column still holds a copy: freed at a later step, never reused before
            logger.warning(
                "steer_plugin: rows of %s %s stay reserved until no step uses them", cmd.kind, cmd.id
            )
        logger.info("steer_plugin: unloaded %s %s (revision %s)", cmd.kind, cmd.id, loaded.revision)
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=entry.size)

    def _release_slots_using(self, layer: int, entry: BankEntry) -> None:
        """Give back every slot whose tables name the entry's rows: requests that finished since the last step
        (the API refuses unloads while running requests use the source). Read from the tables, not the cached
        plans: an earlier unload drops those, and the rows would then stay taken until the next step."""
        target = self.target
        slot_of = target.step.slot_of
        using = set(target.tables[layer].slots_using_rows(list(slot_of.values()), entry.offset, entry.size))
        req_ids = [req_id for req_id, slot in slot_of.items() if slot in using]
        if req_ids:
            target.release_slots(req_ids)  # the next step is not steady: it assigns slots afresh

    def release_retired(self) -> None:
        """Free the rows of retired entries that no working-set column holds any more (called per step)."""
        if not self.retired:
            return
        still = []
        for layer, entry in self.retired:
            if self.target.tables[layer].uses_rows(entry.offset, entry.size):
                still.append((layer, entry))
            else:
                self.target.banks[layer].release(entry)
        self.retired = still
