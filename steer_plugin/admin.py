"""The admin API's API-process side: load and unload SAEs, vectors and probes while the server runs.

A load is checked here first (operator key, allowed roots, pickle policy, the file itself, the layer's
reservation), then sent to every worker (`broadcast`: vLLM's collective_rpc, so every TP and PP rank): staged
(each worker reads the files in a background thread while the engine keeps serving; polled until ready), then
committed (rows copied into the bank, between two steps). Which ids may load or unload is the workers'
registry's rule (engine/load_registry.py: an id configured, loaded or being loaded is refused with a 409,
whichever API process asks), and the catalog is this process's copy of that registry (catalog_sync.py),
brought up to date before every admin call and from what every commit or unload answers: only when every
worker has written a source does the catalog name it, so no request can resolve against a source some worker
lacks. A failed load is rolled back on every worker (its own revision only). Nothing slow runs under the
sync's lock: the files are read (here and in the workers) before it is taken, and an unrelated unload never
waits for them. Every file a load opens, by any route (the body's paths, the files in the SAE's folder, loader
options, links), must resolve under runtime.roots (steer_plugin.files.confined), here and again in each
worker. An unload is refused while running requests of this API process use the source (`InFlight`), leaves
the catalog first, then the workers (which free the rows once no working-set column holds them). Another API
process's requests are not counted here; one resolved against the source before the unload never reads rows of
anything else (its revision no longer matches: the workers run it unsteered from the next step and count it).
Each load gets a new revision that requests carry (ResolvedOp.revision), so a request never reads the rows of
an unloaded or reloaded source, and prefix-cache salts of different loads differ. A probe takes no bank rows:
it may be loaded at any layer whose residual the workers capture (a layer with an SAE or a probe, or a
reserved one: Sources.read_layers), where each worker adds it to its ProbeReader.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from steer_plugin import metrics
from steer_plugin.catalog import LoadedSAE, load_probe_source, load_sae_source, load_vector_source
from steer_plugin.catalog_sync import Broadcast, CatalogSync, Link, Loaded, RuntimeSources
from steer_plugin.config import ConfigError, ProbeSource, RuntimeConfig, SAESource, VectorSource
from steer_plugin.files import FileRefused, confined, real_path, under
from steer_plugin.messages import LoadCommand, LoadOutcome
from steer_plugin.request.ops import ResolvedOp
from steer_plugin.request.schema import SpecError, first_error

logger = logging.getLogger("steer_plugin")

ADMIN_KEY_HEADER = b"x-steer-admin-key"
KINDS = {"saes": "sae", "vectors": "vector", "probes": "probe"}  # route segment -> kind
Source = SAESource | VectorSource | ProbeSource
MODELS = {"sae": SAESource, "vector": VectorSource, "probe": ProbeSource}
LOAD_TIMEOUT_S = 600.0
POLL_S = 0.2  # between two polls of the workers' background reads (each poll: one quick collective_rpc)
START_UP_ONLY_KEYS = ("release", "sae_id", "neuronpedia", "hub_revision")
"""SAESource keys that name an SAE through the Hub registry: resolved from the configuration at start-up, refused
by runtime loads (which take a `path` under runtime.roots)."""


class InFlight:
    """How many running requests use each source, counted from resolution to the end of the response."""

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def sources(ops: list[ResolvedOp], observed: list[str], probes: list[str] = ()) -> list[tuple[str, str]]:
        """(kind, id) of every SAE, vector and probe a request steers with, conditions on, or reads."""
        used = {("sae" if op.kind == "feature" else "vector", op.source) for op in ops if op.kind != "inline"}
        used |= {("sae", op.when.sae) for op in ops if op.when is not None}
        used |= {("sae", sae) for sae in observed}
        used |= {("probe", probe) for probe in probes}
        return sorted(used)

    @staticmethod
    def used_by(planned) -> list[tuple[str, str]]:
        """`sources` of a planned request (request/plan.PlannedRequest)."""
        observe = planned.observe
        observed, probes = (list(observe.saes), list(observe.probes)) if observe is not None else ([], [])
        return InFlight.sources(list(planned.ops), observed, probes)

    @contextmanager
    def holding(self, sources: list[tuple[str, str]]) -> Iterator[None]:
        self.counts.update(sources)
        try:
            yield
        finally:
            self.counts.subtract(sources)
            for key in sources:
                if self.counts[key] <= 0:
                    del self.counts[key]


class Sources(RuntimeSources, Protocol):
    """What the admin API needs of the API process's loaded sources (SteeringService implements it)."""

    in_flight: InFlight  # requests using each source, counted from resolution to the end of the response

    def source(self, kind: str, source_id: str) -> Loaded | None: ...

    def d_model(self) -> int | None: ...

    def read_layers(self) -> set[int]: ...  # layers with an SAE or a probe (the workers capture there too)

    # (a probe of SAE features is checked against its SAE)
    def loaded_saes(self) -> Mapping[str, LoadedSAE]: ...

    def probes_reading(self, sae_id: str) -> list[str]: ...  # the loaded probes that read this SAE's features

    def remove_source(self, kind: str, source_id: str) -> None: ...

    def describe(self, kind: str, source_id: str) -> dict: ...


class Admin:
    """Runtime loads for one API process (see the module docstring)."""

    def __init__(self, sources: Sources, runtime: RuntimeConfig):
        self.sources = sources
        self.runtime = runtime
        self.key = runtime.key()
        self.roots = [Path(os.path.realpath(root)) for root in runtime.roots]
        self.sync = CatalogSync(sources, self._read_entry)  # its lock: one commit or unload at a time

    # --- checks --------------------------------------------------------------------------------------------

    def check_key(self, given: bytes | None) -> None:
        if given is None:
            raise SpecError("x-steer-admin-key", "the admin routes need the X-Steer-Admin-Key header", 401)
        if not hmac.compare_digest(given, self.key.encode()):
            raise SpecError("x-steer-admin-key", "wrong admin key", 401)

    def _parse(self, kind: str, body: object) -> Source:
        if not isinstance(body, dict):
            raise SpecError("body", "must be a JSON object")
        model = MODELS[kind]
        if kind == "sae":  # naming by release resolves (and may download) from the Hub: at start-up only
            for key in START_UP_ONLY_KEYS:
                if key in body:
                    raise SpecError(
                        key,
                        "runtime loads take a `path` under runtime.roots; SAEs named by `release` + `sae_id` "
                        "or `neuronpedia` are resolved from the configuration at start-up",
                    )
            if "path" not in body:
                raise SpecError("path", "Field required")
        try:
            source = model.model_validate(body)
        except ValidationError as err:
            raise first_error(err) from None
        for field in ("path", "labels", "explanations"):
            value = getattr(source, field, None)
            if value is not None:
                setattr(source, field, self._allowed_path(field, value))
        for name, value in (getattr(source, "options", None) or {}).items():
            # Loader options name things inside the SAE's folder (sparsify's `hookpoint`), never a path.
            if isinstance(value, str) and (value in (".", "..") or any(c in value for c in "/\\\0")):
                raise SpecError(f"options.{name}", "must be a name inside the SAE's folder, not a path", 403)
        if getattr(source, "allow_pickle", False) and not self.runtime.allow_pickle:
            raise SpecError("allow_pickle", "pickle loading is not allowed here (runtime.allow_pickle)", 403)
        return source

    def _allowed_path(self, field: str, value: str) -> str:
        """The real path of `value` if it lies under an allowed root (403 otherwise: nothing else is said
        about the file, so the admin API does not probe the server's disk)."""
        if not os.path.isabs(value):
            raise SpecError(field, "must be an absolute path on the server")
        try:
            real = real_path(value)
        except FileRefused as err:
            raise SpecError(field, err.reason) from None
        if not under(real, [str(root) for root in self.roots]):
            raise SpecError(field, "is not under an allowed root (runtime.roots)", 403)
        return real

    def _read_source(self, kind: str, source: Source, d_model: int | None) -> Loaded:
        """The source as the API process holds it (an SAE's header, a probe's probe.json: no weights), every
        file it opens under the roots (a thread: a big or slow file must not stall the event loop)."""
        with confined([str(root) for root in self.roots]):
            if kind == "sae":
                return load_sae_source(source, "body", d_model, weights=False)
            if kind == "probe":
                return load_probe_source(
                    source, "body", d_model, weights=False, saes=self.sources.loaded_saes()
                )
            return load_vector_source(source, "body", d_model)

    def _read_entry(self, kind: str, fields: dict) -> Loaded:
        """A source another API process loaded (its fields as the registry holds them), read as loads read."""
        return self._read_source(kind, MODELS[kind].model_validate(fields), self.sources.d_model())

    def reads(self, layer: int) -> bool:
        """Whether the workers capture the residual after `layer` (a probe or a residual read may go there)."""
        return self.runtime.reserves(layer) or layer in self.sources.read_layers()

    def _check_layer(self, kind: str, layer: int) -> None:
        if kind == "probe":
            if not self.reads(layer):
                raise SpecError(
                    "layer",
                    f"the probe reads layer {layer}, where the workers capture nothing: load it at a layer with "
                    f"an SAE or a probe, or reserved (runtime.layers = {self.runtime.layers})",
                )
        elif not self.runtime.reserves(layer):
            raise SpecError(
                "layer", f"layer {layer} has no reserved rows; runtime.layers = {self.runtime.layers}"
            )

    # --- load and unload -----------------------------------------------------------------------------------

    async def load(self, kind: str, body: object, broadcast: Broadcast) -> dict:
        """Load one SAE, vector or probe everywhere; its description (as GET /v1/steering/saes lists it)."""
        try:
            described = await self._load(kind, body, broadcast)
        except SpecError as err:
            outcome = "failed" if err.status >= 500 and err.status != 507 else "refused"
            metrics.RUNTIME_LOADS.labels(kind=kind, action="load", outcome=outcome).inc()
            logger.warning("steer_plugin: runtime load of a %s refused: %s", kind, err)
            raise
        metrics.RUNTIME_LOADS.labels(kind=kind, action="load", outcome="ok").inc()
        return described

    async def current(self, broadcast: Broadcast) -> None:
        """This process's catalog brought to the workers' registry (every admin call reads it first)."""
        await self.sync.current(Link(lambda command: self._broadcast(broadcast, command), shared=True))

    async def _load(self, kind: str, body: object, broadcast: Broadcast) -> dict:
        source = self._parse(kind, body)
        await self.current(broadcast)  # the layers probes may read, as every process's loads left them
        sources = self.sources
        try:  # the header only (no weights in the API process); the workers' reads check the weights
            loaded = await asyncio.to_thread(self._read_source, kind, source, sources.d_model())
        except ConfigError as err:
            raise SpecError(err.field, str(err).removeprefix("body ").strip(), err.status) from None
        self._check_layer(kind, loaded.layer)
        revision = uuid.uuid4().hex[:12]
        command = LoadCommand("stage", kind, source.id, revision, source.model_dump())
        done = False
        try:
            outcomes = await self._staged(broadcast, command)  # the registry refuses a taken id (409)
            if not any(o.owned for o in outcomes):
                raise SpecError("layer", f"no worker holds layer {loaded.layer}", 500)
            async with self.sync.changing():  # the commit: quick row copies in every worker
                outcomes = await self._broadcast(broadcast, command._replace(action="load").signed())
                failed = [o for o in outcomes if not o.ok]
                if failed:  # undone where it was written (this revision only: never another process's load)
                    unload = LoadCommand("unload", kind, source.id, revision).signed()
                    await self.sync.apply(await self._broadcast(broadcast, unload, quiet=True))
                    raise self._worst(failed)
                await self.sync.apply(outcomes, loaded._replace(revision=revision))
                done = True
        finally:
            if not done:  # refused, failed or the client left: no worker keeps the files it read
                discard = command._replace(action="discard").signed()
                await asyncio.shield(self._broadcast(broadcast, discard, quiet=True))
        logger.info(
            "steer_plugin: runtime load: %s %s (revision %s) at layer %d from %s",
            kind,
            source.id,
            revision,
            loaded.layer,
            source.path,
        )
        return sources.describe(kind, source.id)

    async def _staged(self, broadcast: Broadcast, command: LoadCommand) -> list[LoadOutcome]:
        """Every worker's outcome once its background read is done (SpecError for the worst failure)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_TIMEOUT_S
        outcomes = await self._broadcast(broadcast, command.signed())
        poll = command._replace(action="poll").signed()
        while True:
            failed = [o for o in outcomes if not o.ok]
            if failed:
                raise self._worst(failed)
            if not any(o.pending for o in outcomes):
                return outcomes
            if loop.time() > deadline:
                raise SpecError(
                    "path", f"the workers did not read the files within {LOAD_TIMEOUT_S:g} s", 504
                )
            await asyncio.sleep(POLL_S)
            outcomes = await self._broadcast(broadcast, poll)

    @staticmethod
    def _worst(failed: list[LoadOutcome]) -> SpecError:
        worst = max(failed, key=lambda o: o.status)
        status = worst.status
        field = worst.field or ("id" if status == 409 else "path" if status in (400, 403) else "body")
        return SpecError(field, worst.error or "a worker refused the load", status)

    async def unload(self, kind: str, source_id: str, broadcast: Broadcast) -> dict:
        try:
            await self.current(broadcast)
            async with self.sync.changing():
                result = await self._unload(kind, source_id, broadcast)
        except SpecError as err:
            outcome = "failed" if err.status >= 500 else "refused"
            metrics.RUNTIME_LOADS.labels(kind=kind, action="unload", outcome=outcome).inc()
            logger.warning("steer_plugin: runtime unload of %s %r refused: %s", kind, source_id, err)
            raise
        metrics.RUNTIME_LOADS.labels(kind=kind, action="unload", outcome="ok").inc()
        return result

    async def _unload(self, kind: str, source_id: str, broadcast: Broadcast) -> dict:
        sources = self.sources
        loaded = sources.source(kind, source_id)
        if loaded is None:
            raise SpecError("id", f"no {kind} {source_id!r} is loaded", 404)
        if not loaded.revision:
            raise SpecError(
                "id", f"{kind} {source_id!r} is configured at start-up; it cannot be unloaded", 409
            )
        readers = sources.probes_reading(source_id) if kind == "sae" else []
        if readers:
            raise SpecError("id", f"probe(s) {readers} read SAE {source_id!r}: unload them first", 409)
        using = sources.in_flight.counts.get((kind, source_id), 0)
        if using:
            raise SpecError(
                "id", f"{kind} {source_id!r} is in use by {using} running request(s); retry later", 409
            )
        sources.remove_source(kind, source_id)  # no request of this process resolves against it from here on
        command = LoadCommand("unload", kind, source_id, loaded.revision).signed()
        outcomes = await self._broadcast(broadcast, command)
        await self.sync.apply(outcomes)  # the registry: back in the catalog if it was loaded again since
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise self._worst(failed)
        logger.info("steer_plugin: runtime unload: %s %s (revision %s)", kind, source_id, loaded.revision)
        return {"id": source_id, "object": kind, "deleted": True, "revision": loaded.revision}

    async def _broadcast(
        self, broadcast: Broadcast, command: LoadCommand, quiet: bool = False
    ) -> list[LoadOutcome]:
        try:
            return list(await broadcast(command))
        except Exception as err:
            self.sync.invalidate()  # what the workers hold now is read again before the catalog is trusted
            if quiet:
                logger.error("steer_plugin: rollback of a runtime load failed: %s", err)
                return []
            raise SpecError("body", f"the workers did not answer: {type(err).__name__}: {err}", 503) from None
