"""One API process's copy of the runtime loads, kept current from the workers' registry.

With `--api-server-count N` vLLM runs N API server processes over one engine core, each with its own
SteeringService: its own catalog, discovery snapshot and in-flight counts. Each reaches the same workers
through its own engine client (a collective_rpc is a utility call the engine core answers to the process that
sent it). The workers' registry (engine/load_registry.py) is the one record of what is loaded; API processes
never talk to each other: each reads the registry (a `catalog` LoadCommand; every load and unload answers with
it too) and brings its copy to it in one swap of the catalog. A source new to this process is read here (its
header, labels and probe.json: parsed once per process), one gone or loaded again is dropped or replaced.

When it reads:
- every admin call (load, unload, fit) reads first, and applies what its own commit or unload answers;
- with other API processes (`Link.shared`), each discovery call, and each request that names a source loaded
  at runtime or an id this copy does not know, reads before it is answered (a request is planned again when
  the copy changed). With one API process every change goes through this copy: nothing else is read.

A read begun after the caller arrived is what counts, so a load answered (201) before a request arrived is
seen by it; callers waiting together share one read (one in flight per process at most), so a burst of
requests costs one round trip through the engine core, not one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import NamedTuple, Protocol

from steer_plugin import metrics
from steer_plugin.catalog import LoadedProbe, LoadedSAE, LoadedVector
from steer_plugin.config import ConfigError
from steer_plugin.messages import LoadCommand, LoadOutcome, RuntimeEntry

logger = logging.getLogger("steer_plugin")

Loaded = LoadedSAE | LoadedVector | LoadedProbe
Broadcast = Callable[
    [LoadCommand], Awaitable[list[LoadOutcome]]
]  # a signed command to every worker -> answers
Read = Callable[
    [str, dict], Loaded
]  # (kind, the load's source fields) -> the source as this process holds it
READ = LoadCommand("catalog", "", "")


class Link(NamedTuple):
    """How an API process reaches the workers' runtime loads (api/engine.load_link builds it)."""

    broadcast: Broadcast
    shared: bool  # other API server processes load and unload too (--api-server-count > 1)


class RuntimeSources(Protocol):
    """The copy the sync keeps (SteeringService implements it)."""

    def runtime_sources(self) -> dict[tuple[str, str], Loaded]: ...  # (kind, id) -> loaded at runtime

    def set_runtime_sources(self, loaded: list[Loaded], generation: int) -> None: ...  # one swap


def kind_of(loaded: Loaded) -> str:
    return (
        "sae" if isinstance(loaded, LoadedSAE) else "vector" if isinstance(loaded, LoadedVector) else "probe"
    )


class CatalogSync:
    def __init__(self, sources: RuntimeSources, read: Read):
        self.sources = sources
        self._read = read
        self.generation = 0  # the registry's generation this copy was built from (0: nothing loaded yet)
        self._lock = asyncio.Lock()  # one read, commit or unload at a time
        self._began = 0  # reads (commits, unloads) begun
        self._round = 0  # the one running now
        self._done = 0  # the last one applied
        self._named: set[tuple[str, str, str]] = set()  # (kind, id, revision) the copy names

    async def current(self, link: Link | None, forced: bool = False) -> None:
        """Bring the copy to what a read of the registry begun after this call finds (with other API
        processes, or `forced`; the read's exception, if it fails)."""
        if link is None or not (link.shared or forced):
            return
        arrival = self._began
        async with self._lock:
            if self._done > arrival:  # a read begun after this call was applied while it waited
                return
            self._begin()
            await self.apply(await link.broadcast(READ.signed()))

    @asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """Held while this process commits a load or unloads (reads wait); `apply` what the workers answer."""
        async with self._lock:
            self._begin()
            yield

    def invalidate(self) -> None:
        """The copy may differ from the registry (a command's answer was lost): the next read rebuilds it."""
        self.generation = -1

    def _begin(self) -> None:
        self._began += 1
        self._round = self._began

    async def apply(self, outcomes: list[LoadOutcome], hint: Loaded | None = None) -> None:
        """Bring the copy to the registry the workers' `outcomes` carry (under `current` or `changing`).
        `hint`: what this process just loaded (read already). A source counts once every worker has it."""
        answered = [o for o in outcomes if o.generation >= 0]
        if not answered:
            self.invalidate()
            return
        generation = max(o.generation for o in answered)
        if generation != self.generation:
            common = set.intersection(*({e.key for e in o.entries} for o in answered))
            await self._rebuild([e for e in answered[0].entries if e.key in common], hint, generation)
        self._done = self._round

    async def _rebuild(self, entries: list[RuntimeEntry], hint: Loaded | None, generation: int) -> None:
        have = self.sources.runtime_sources()
        hints = {} if hint is None else {(kind_of(hint), hint.id, hint.revision): hint}
        copy = []
        for entry in entries:
            old = have.get((entry.kind, entry.id))
            if old is not None and old.revision == entry.revision:
                copy.append(old)
            elif entry.key in hints:
                copy.append(hints[entry.key])
            else:
                try:
                    loaded = await asyncio.to_thread(self._read, entry.kind, entry.source)
                except (ConfigError, OSError, ValueError) as err:
                    logger.error(
                        "steer_plugin: %s %s (revision %s) is loaded in the workers, but this API process "
                        "cannot read its files, so it does not name it: %s",
                        *entry.key,
                        err,
                    )
                    continue
                copy.append(loaded._replace(revision=entry.revision))
        self.sources.set_runtime_sources(copy, generation)
        named = {(kind_of(s), s.id, s.revision) for s in copy}
        for kind, sid, _ in self._named - named:  # an SAE gone (or loaded again): its API-side series go too
            if kind == "sae":
                metrics.forget_sae(sid)
        self._named = named
        self.generation = generation
        metrics.CATALOG_GENERATION.set(generation)
        logger.info(
            "steer_plugin: runtime catalog at generation %d: %s",
            generation,
            ", ".join(f"{kind_of(s)} {s.id}" for s in copy) or "nothing loaded at runtime",
        )
