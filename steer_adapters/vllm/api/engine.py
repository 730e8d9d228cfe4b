"""The served engine as the API process sees it: the model's shape and the workers' collective_rpc.

The middleware holds nothing else of the engine (tests/adapters/test_vllm_boundary.py).
"""

from __future__ import annotations

import asyncio
import functools
import importlib

from steer_adapters.vllm.worker import extension
from steer_plugin.admin import LOAD_TIMEOUT_S
from steer_plugin.catalog_sync import Link
from steer_plugin.messages import LoadCommand, LoadOutcome, WorkerStats


def model_shape(app_state) -> tuple[int, int] | None:
    """(decoder layers, d_model) of the served model, from the API server's engine client (None before the
    engine is up)."""
    engine = getattr(app_state, "engine_client", None)
    model_config = getattr(engine, "model_config", None)
    text = getattr(model_config, "hf_text_config", None)
    if text is None:
        return None
    return int(text.num_hidden_layers), int(text.hidden_size)


def max_model_len(app_state) -> int | None:
    """The served model's context length (None before the engine is up)."""
    engine = getattr(app_state, "engine_client", None)
    value = getattr(getattr(engine, "model_config", None), "max_model_len", None)
    return int(value) if isinstance(value, int) else None


MISSING_EXTENSION = (
    f"the workers lack {extension.EXTENSION_PATH}: start the server with steer-serve, or pass "
    f"--worker-extension-cls {extension.EXTENSION_PATH} to vLLM"
)


@functools.cache
def _provides_extension(qualname: str) -> bool:
    if not qualname:
        return False
    module, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return extension.is_extension(cls)


class EngineWorkers:
    """The served engine's workers from the API process: vLLM's engine client (app.state.engine_client) and its
    collective_rpc, which calls a extension.SteerWorkerExtension method on every TP and PP rank."""

    def __init__(self, engine_client) -> None:
        self._engine = engine_client

    @classmethod
    def of(cls, app_state) -> EngineWorkers | None:
        """The workers of the app's engine, or None before the engine is up."""
        engine = getattr(app_state, "engine_client", None)
        return None if engine is None else cls(engine)

    @property
    def api_process_count(self) -> int:
        """How many API server processes this server runs (--api-server-count): each holds its own copy of the
        catalog, and reaches these same workers through its own engine client (a collective_rpc is a utility
        call the engine core answers to the process that sent it)."""
        parallel = self._engine.vllm_config.parallel_config
        return int(getattr(parallel, "_api_process_count", 1))

    @property
    def have_extension(self) -> bool:
        """Whether the workers were started with the extension (--worker-extension-cls, resolved as vLLM does)."""
        return _provides_extension(self._engine.vllm_config.parallel_config.worker_extension_cls)

    async def _every_worker(self, method: str, timeout: float, args: tuple = ()) -> list[object]:
        """`method` on every worker of every engine core, one answer per worker. Under data parallelism
        (--data-parallel-size > 1) vLLM's collective_rpc reaches every engine core but answers with the first
        one's workers only (DPLBAsyncMPClient.call_utility_async): the figures and load outcomes of the other
        DP ranks would be lost. So the engine core's own `collective_rpc` utility is called on each engine core
        this API process manages, and the answers joined in engine order."""
        call_all = getattr(getattr(self._engine, "engine_core", None), "call_utility_all_async", None)
        if call_all is None:  # not vLLM's multiprocess client (one engine core): collective_rpc is all of it
            return list(await self._engine.collective_rpc(method, timeout=timeout, args=args))
        per_engine = await call_all("collective_rpc", method, timeout, args, None)
        return [answer for answers in per_engine for answer in answers]

    async def stats(self, timeout: float) -> list[WorkerStats]:
        """Every worker's Steerer.stats, on every DP rank (workers without a steerer left out). The messages
        cross as their wire dicts (steer_plugin.messages): rebuilt here, so the rest of the API process holds
        typed messages."""
        name = extension.SteerWorkerExtension.steer_plugin_stats.__name__
        outcomes = await self._every_worker(name, timeout)
        return [WorkerStats.from_wire(o) for o in outcomes if o is not None]

    async def load(self, command: LoadCommand, timeout: float) -> list[LoadOutcome]:
        """One runtime LoadCommand on every worker of every DP rank (sent as its wire dict); their
        LoadOutcomes, so that one failing rank fails (and rolls back) the load."""
        name = extension.SteerWorkerExtension.steer_plugin_load.__name__
        outcomes = await self._every_worker(name, timeout, args=(command.wire(),))
        return [LoadOutcome.from_wire(o) for o in outcomes]

    async def broadcast(self, command: LoadCommand) -> list[LoadOutcome]:
        """`load` with the admin API's timeout (steer_plugin.admin.Broadcast)."""
        return await self.load(command, timeout=LOAD_TIMEOUT_S)

    def link(self) -> Link:
        return Link(self.broadcast, shared=self.api_process_count > 1)


class EngineProbe:
    """Whether the engine core answers at all: a utility call (`is_sleeping`) that the engine core serves
    between two steps, so no reply means it is stuck inside one (or in a worker call). However many /health
    calls come in, one probe is in flight at a time and they all wait on it."""

    _probes: dict[int, EngineProbe] = {}

    def __init__(self, engine_client) -> None:
        self._engine = engine_client
        self._task: asyncio.Task | None = None

    @classmethod
    def of(cls, app_state) -> EngineProbe | None:
        engine = getattr(app_state, "engine_client", None)
        if engine is None or not hasattr(engine, "is_sleeping"):
            return None
        probe = cls._probes.get(id(engine))
        if probe is None or probe._engine is not engine:
            probe = cls._probes[id(engine)] = cls(engine)
        return probe

    async def answers(self, timeout: float) -> bool:
        """True if the engine core replied within `timeout` seconds."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._engine.is_sleeping())
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            return False
        except Exception:  # a dead engine: vLLM's own /health says so
            return True
        return True


def load_link(app_state) -> Link | None:
    """How this API process reads the workers' runtime loads (steer_plugin/catalog_sync.py); None before the
    engine is up or without the worker extension (then nothing is ever loaded at runtime)."""
    workers = EngineWorkers.of(app_state)
    return workers.link() if workers is not None and workers.have_extension else None


def ready_workers(app_state) -> EngineWorkers:
    """The engine's workers, when runtime loads (and fits) can reach them all; SpecError otherwise. With
    several API processes, each loads through the same workers: their registry keeps the catalogs one."""
    from steer_plugin.request.schema import SpecError

    workers = EngineWorkers.of(app_state)
    if workers is None:
        raise SpecError("path", "the engine is not ready", status=503)
    if not workers.have_extension:
        raise SpecError("path", f"runtime loads are off: {MISSING_EXTENSION}", status=503)
    return workers
