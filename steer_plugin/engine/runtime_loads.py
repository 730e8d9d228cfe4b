"""Loading and unloading SAEs and vectors in a running worker (the admin API's worker side).

Each load writes into rows the bank reserved at start-up (runtime.rows_per_layer), so no buffer a compiled
or captured graph reads ever moves; the op reads the working set, which copies bank rows when a request takes
them. An unload retires the entry (no new plan can name it) and gives back the slots of requests whose plans
name it: the API refuses unloads while running requests use a source, so those are requests that finished
since the last step (the worker learns of that only at the next step). Their working-set columns go with
them, so the rows are free at once and a later load into them can never be confused with the old one.

Commands arrive through vLLM's collective_rpc between steps (never during a forward) as plain dicts, and
every outcome is a plain dict: a broken file must not raise inside the engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import torch

from steer_plugin.catalog import load_sae_source, load_vector_source
from steer_plugin.config import ConfigError, SAESource, VectorSource
from steer_plugin.engine.bank import BankEntry, BankFull, sae_params, vector_params

if TYPE_CHECKING:
    from steer_plugin.engine.steerer import Steerer

logger = logging.getLogger("steer_plugin")


class LoadCommand(NamedTuple):
    """What the API process asks every worker to do (sent as a dict: `LoadCommand(**d)`)."""

    action: str  # "load" or "unload"
    kind: str  # "sae" or "vector"
    id: str
    revision: str = ""  # load: the revision requests will name
    source: dict | None = None  # load: SAESource / VectorSource fields


class LoadOutcome(NamedTuple):
    """One worker's answer (sent as a dict)."""

    ok: bool
    owned: bool = False  # this worker holds the layer (pipeline ranks own some layers only)
    status: int = 200  # on failure: the HTTP status the API should answer with
    error: str = ""
    layer: int = -1
    rows: int = 0


class RuntimeLoads:
    """The worker's runtime loads: which entries are live, which are retired and waiting to be freed."""

    def __init__(self, steerer: Steerer):
        self.steerer = steerer
        self.retired: list[tuple[int, BankEntry]] = []  # (layer, entry) whose rows may still be in use

    def command(self, raw: dict) -> dict:
        """Run one LoadCommand; its LoadOutcome as a dict."""
        try:
            cmd = LoadCommand(**raw)
            if cmd.action == "load":
                outcome = self._load_sae(cmd) if cmd.kind == "sae" else self._load_vector(cmd)
            elif cmd.action == "unload":
                outcome = self._unload(cmd)
            else:
                outcome = LoadOutcome(False, status=400, error=f"unknown action {cmd.action!r}")
        except ConfigError as err:
            outcome = LoadOutcome(False, status=400, error=str(err))
        except BankFull as err:
            outcome = LoadOutcome(False, status=507, error=str(err))
        except Exception as err:  # never take the engine down
            logger.exception("steer_plugin: runtime %s failed", raw.get("action"))
            outcome = LoadOutcome(False, status=500, error=f"{type(err).__name__}: {err}")
        return outcome._asdict()

    def _bank(self, layer: int, what: str):
        """The layer's bank if this worker owns it (None otherwise); ConfigError without reserved rows."""
        bank = self.steerer.banks.get(layer)
        config = self.steerer.config.runtime
        reserved = config is not None and (config.layers == "any" or layer in config.layers)
        if not reserved:
            raise ConfigError(f"{what}: layer {layer} has no reserved rows (runtime.layers)")
        return bank

    def _load_sae(self, cmd: LoadCommand) -> LoadOutcome:
        steerer = self.steerer
        source = SAESource(**cmd.source)
        loaded = load_sae_source(source, "sae", steerer.d_model, explanations=False)
        bank = self._bank(loaded.layer, "sae")
        if bank is None:
            return LoadOutcome(True, owned=False, layer=loaded.layer)
        if ("feature", cmd.id) in bank.entries:
            return LoadOutcome(False, status=409, error=f"SAE {cmd.id!r} is already loaded")
        sae = loaded.sae
        bank.place("feature", cmd.id, cmd.revision, sae.W_dec.float(), sae.W_enc.t().float(), sae_params(sae))
        steerer.tables[loaded.layer].bank_rows_changed()
        loaded = loaded._replace(revision=cmd.revision)
        steerer.assets.saes[cmd.id] = loaded
        steerer.observer.add(cmd.id, steerer.sae_view(loaded))
        logger.info(
            "steer_plugin: loaded SAE %s (revision %s, %d features) into layer %d",
            cmd.id,
            cmd.revision,
            sae.d_sae,
            loaded.layer,
        )
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=sae.d_sae)

    def _load_vector(self, cmd: LoadCommand) -> LoadOutcome:
        steerer = self.steerer
        loaded = load_vector_source(VectorSource(**cmd.source), "vector", steerer.d_model)
        bank = self._bank(loaded.layer, "vector")
        if bank is None:
            return LoadOutcome(True, owned=False, layer=loaded.layer)
        if ("vector", cmd.id) in bank.entries:
            return LoadOutcome(False, status=409, error=f"vector {cmd.id!r} is already loaded")
        vec = loaded.vector
        bank.place("vector", cmd.id, cmd.revision, vec[None], torch.zeros(1, vec.numel()), vector_params(vec))
        steerer.tables[loaded.layer].bank_rows_changed()
        steerer.assets.vectors[cmd.id] = loaded._replace(revision=cmd.revision)
        logger.info(
            "steer_plugin: loaded vector %s (revision %s) into layer %d", cmd.id, cmd.revision, loaded.layer
        )
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=1)

    def _unload(self, cmd: LoadCommand) -> LoadOutcome:
        steerer = self.steerer
        kind = "feature" if cmd.kind == "sae" else "vector"
        assets = steerer.assets.saes if cmd.kind == "sae" else steerer.assets.vectors
        loaded = assets.get(cmd.id)
        if loaded is None:
            return LoadOutcome(True, owned=False)  # another pipeline rank holds it (or it never loaded)
        if not loaded.revision:
            return LoadOutcome(
                False, status=409, error=f"{cmd.kind} {cmd.id!r} is configured, not loaded at runtime"
            )
        entry = steerer.banks[loaded.layer].retire(kind, cmd.id)
        del assets[cmd.id]
        if cmd.kind == "sae":
            steerer.observer.remove(cmd.id)
        steerer.release_requests_using(loaded.layer, entry.offset, entry.size)
        # Cached plans name bank rows: a request that comes back compiles afresh (and finds no such source).
        steerer.drop_plans()
        self.retired.append((loaded.layer, entry))
        self.release_retired()
        if self.retired:  # a column still holds a copy: freed at a later step, never reused before
            logger.warning(
                "steer_plugin: rows of %s %s stay reserved until no step uses them", cmd.kind, cmd.id
            )
        logger.info("steer_plugin: unloaded %s %s (revision %s)", cmd.kind, cmd.id, loaded.revision)
        return LoadOutcome(True, owned=True, layer=loaded.layer, rows=entry.size)

    def release_retired(self) -> None:
        """Free the rows of retired entries that no working-set column holds any more (called per step)."""
        if not self.retired:
            return
        still = []
        for layer, entry in self.retired:
            if self.steerer.tables[layer].uses_rows(entry.offset, entry.size):
                still.append((layer, entry))
            else:
                self.steerer.banks[layer].release(entry)
        self.retired = still
