"""The admin API's API-process side: load and unload SAEs and vectors while the server runs.

A load is checked here first (operator key, allowed roots, pickle policy, the file itself, the layer's
reservation), then sent to every worker (`broadcast`: vLLM's collective_rpc, so every TP and PP rank); only
when every worker has written it does the catalog name it, so no request can resolve against a source some
worker lacks. A failed load is rolled back on every worker. An unload is refused while running requests use
the source (`InFlight`), leaves the catalog first, then the workers (which free the rows once no working-set
column holds them). Each load gets a new revision that requests carry (ResolvedOp.revision), so a request
never reads the rows of an unloaded or reloaded source, and prefix-cache salts of different loads differ.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from steer_plugin import metrics
from steer_plugin.catalog import LoadedSAE, LoadedVector, load_sae_source, load_vector_source
from steer_plugin.config import ConfigError, RuntimeConfig, SAESource, VectorSource
from steer_plugin.engine.runtime_loads import LoadCommand
from steer_plugin.request.schema import SpecError, json_path
from steer_plugin.request.wire import ResolvedOp

logger = logging.getLogger("steer_plugin")

ADMIN_KEY_HEADER = b"x-steer-admin-key"
KINDS = {"saes": "sae", "vectors": "vector"}  # route segment -> kind
Broadcast = Callable[[dict], Awaitable[list[dict]]]  # a LoadCommand to every worker -> their LoadOutcomes
LOAD_TIMEOUT_S = 600.0
START_UP_ONLY_KEYS = ("release", "sae_id", "neuronpedia", "hub_revision")
"""SAESource keys that name an SAE through the Hub registry: resolved from the configuration at start-up, refused
by runtime loads (which take a `path` under runtime.roots)."""


class InFlight:
    """How many running requests use each source, counted from resolution to the end of the response."""

    def __init__(self):
        self.counts: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def sources(ops: list[ResolvedOp], observed: list[str]) -> list[tuple[str, str]]:
        """(kind, id) of every SAE and vector a request steers with, conditions on, or reads."""
        used = {("sae" if op.kind == "feature" else "vector", op.source) for op in ops if op.kind != "inline"}
        used |= {("sae", op.cond_source) for op in ops if op.cond_sign}
        used |= {("sae", sae) for sae in observed}
        return sorted(used)

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


class Admin:
    """Runtime loads for one API process (see the module docstring)."""

    def __init__(self, service, runtime: RuntimeConfig):
        self.service = service  # steer_plugin.service.SteeringService
        self.runtime = runtime
        self.key = runtime.key()
        self.roots = [Path(os.path.realpath(root)) for root in runtime.roots]
        self._lock = asyncio.Lock()  # one load or unload at a time

    # --- checks --------------------------------------------------------------------------------------------

    def check_key(self, given: bytes | None) -> None:
        if given is None:
            raise SpecError("x-steer-admin-key", "the admin routes need the X-Steer-Admin-Key header", 401)
        if not hmac.compare_digest(given, self.key.encode()):
            raise SpecError("x-steer-admin-key", "wrong admin key", 401)

    def _parse(self, kind: str, body: object) -> SAESource | VectorSource:
        if not isinstance(body, dict):
            raise SpecError("body", "must be a JSON object")
        model = SAESource if kind == "sae" else VectorSource
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
            first = err.errors()[0]
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                msg = "unknown field"
            raise SpecError(json_path("", first["loc"]).lstrip(".") or "body", msg) from None
        for field in ("path", "labels", "explanations"):
            value = getattr(source, field, None)
            if value is not None:
                setattr(source, field, self._allowed_path(field, value))
        if getattr(source, "allow_pickle", False) and not self.runtime.allow_pickle:
            raise SpecError("allow_pickle", "pickle loading is not allowed here (runtime.allow_pickle)", 403)
        return source

    def _allowed_path(self, field: str, value: str) -> str:
        """The real path of `value` if it lies under an allowed root (403 otherwise: nothing else is said
        about the file, so the admin API does not probe the server's disk)."""
        if not os.path.isabs(value):
            raise SpecError(field, "must be an absolute path on the server")
        real = Path(os.path.realpath(value))
        if not any(real == root or root in real.parents for root in self.roots):
            raise SpecError(field, "is not under an allowed root (runtime.roots)", 403)
        return str(real)

    def _reserved(self, layer: int) -> bool:
        layers = self.runtime.layers
        return layers == "any" or layer in layers

    # --- load and unload -----------------------------------------------------------------------------------

    async def load(self, kind: str, body: object, broadcast: Broadcast) -> dict:
        """Load one SAE or vector everywhere; its description (as GET /v1/steering/saes lists it)."""
        async with self._lock:
            try:
                described = await self._load(kind, body, broadcast)
            except SpecError as err:
                outcome = "failed" if err.status >= 500 and err.status != 507 else "refused"
                metrics.RUNTIME_LOADS.labels(kind=kind, action="load", outcome=outcome).inc()
                logger.warning("steer_plugin: runtime load of a %s refused: %s", kind, err)
                raise
            metrics.RUNTIME_LOADS.labels(kind=kind, action="load", outcome="ok").inc()
            return described

    async def _load(self, kind: str, body: object, broadcast: Broadcast) -> dict:
        source = self._parse(kind, body)
        service = self.service
        loaded_now = service.assets.saes if kind == "sae" else service.assets.vectors
        if source.id in loaded_now:
            raise SpecError("id", f"{kind} {source.id!r} is already loaded", 409)
        try:  # in a thread: a big SAE must not stall the server's event loop
            if kind == "sae":
                # the header only (no weights in the API process); the workers' loads read and check them
                loaded = await asyncio.to_thread(
                    load_sae_source, source, "body", service.d_model(), weights=False
                )
            else:
                loaded = await asyncio.to_thread(load_vector_source, source, "body", service.d_model())
        except ConfigError as err:
            raise SpecError("path", str(err).removeprefix("body ").strip()) from None
        if not self._reserved(loaded.layer):
            raise SpecError(
                "layer", f"layer {loaded.layer} has no reserved rows; runtime.layers = {self.runtime.layers}"
            )
        revision = uuid.uuid4().hex[:12]
        command = LoadCommand("load", kind, source.id, revision, source.model_dump())._asdict()
        outcomes = await self._broadcast(broadcast, command)
        failed = [o for o in outcomes if not o.get("ok")]
        if failed or not any(o.get("owned") for o in outcomes):
            await self._broadcast(broadcast, LoadCommand("unload", kind, source.id)._asdict(), quiet=True)
            if not failed:
                raise SpecError("layer", f"no worker holds layer {loaded.layer}", 500)
            worst = max(failed, key=lambda o: o.get("status", 500))
            field = "path" if worst.get("status") == 400 else "id" if worst.get("status") == 409 else "body"
            raise SpecError(
                field, worst.get("error") or "a worker refused the load", worst.get("status", 500)
            )
        service.add_source(loaded._replace(revision=revision))
        logger.info(
            "steer_plugin: runtime load: %s %s (revision %s) at layer %d from %s",
            kind,
            source.id,
            revision,
            loaded.layer,
            source.path,
        )
        return service.describe(kind, source.id)

    async def unload(self, kind: str, source_id: str, broadcast: Broadcast) -> dict:
        async with self._lock:
            try:
                result = await self._unload(kind, source_id, broadcast)
            except SpecError as err:
                outcome = "failed" if err.status >= 500 else "refused"
                metrics.RUNTIME_LOADS.labels(kind=kind, action="unload", outcome=outcome).inc()
                logger.warning("steer_plugin: runtime unload of %s %r refused: %s", kind, source_id, err)
                raise
            metrics.RUNTIME_LOADS.labels(kind=kind, action="unload", outcome="ok").inc()
            return result

    async def _unload(self, kind: str, source_id: str, broadcast: Broadcast) -> dict:
        service = self.service
        loaded: LoadedSAE | LoadedVector | None = (
            service.assets.saes if kind == "sae" else service.assets.vectors
        ).get(source_id)
        if loaded is None:
            raise SpecError("id", f"no {kind} {source_id!r} is loaded", 404)
        if not loaded.revision:
            raise SpecError(
                "id", f"{kind} {source_id!r} is configured at start-up; it cannot be unloaded", 409
            )
        using = service.in_flight.counts.get((kind, source_id), 0)
        if using:
            raise SpecError(
                "id", f"{kind} {source_id!r} is in use by {using} running request(s); retry later", 409
            )
        service.remove_source(kind, source_id)  # no request resolves against it from here on
        outcomes = await self._broadcast(broadcast, LoadCommand("unload", kind, source_id)._asdict())
        failed = [o for o in outcomes if not o.get("ok")]
        if failed:
            raise SpecError(
                "id", f"removed from the catalog, but a worker failed: {failed[0].get('error')}", 500
            )
        logger.info("steer_plugin: runtime unload: %s %s (revision %s)", kind, source_id, loaded.revision)
        return {"id": source_id, "object": kind, "deleted": True, "revision": loaded.revision}

    async def _broadcast(self, broadcast: Broadcast, command: dict, quiet: bool = False) -> list[dict]:
        try:
            return list(await broadcast(command))
        except Exception as err:
            if quiet:
                logger.error("steer_plugin: rollback of a runtime load failed: %s", err)
                return []
            raise SpecError("body", f"the workers did not answer: {type(err).__name__}: {err}", 503) from None
