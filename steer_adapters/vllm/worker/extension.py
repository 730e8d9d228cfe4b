"""The worker side of the API server's calls: vLLM mixes this class into its worker class when the server runs
with `--worker-extension-cls steer_adapters.vllm.worker.extension.SteerWorkerExtension` (steer-serve adds it), and
the API process calls its methods by name through the engine client's collective_rpc (api/engine.EngineWorkers).

vLLM appends the class to the worker class's bases and refuses any name the worker already has, so the
extension only adds methods; the worker's own start-up (load_model, warm-up) stays hooked by worker/install.patch_workers.
The steerer a worker loaded is kept here, by worker, instead of as an attribute set on the worker.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steer_plugin.engine.steerer import Steerer

EXTENSION_PATH = "steer_adapters.vllm.worker.extension.SteerWorkerExtension"

_STEERERS: weakref.WeakKeyDictionary[object, Steerer] = weakref.WeakKeyDictionary()


def attach(worker: object, steerer: Steerer) -> None:
    """Record the steerer `worker` loaded (worker/install.py)."""
    _STEERERS[worker] = steerer


def steerer_of(worker: object) -> Steerer | None:
    """The steerer `worker` loaded, or None (no steering config, or not loaded yet)."""
    return _STEERERS.get(worker)


class NoSteererError(RuntimeError):
    pass


class SteerWorkerExtension:
    """Methods the API server calls on every worker (every TP and PP rank) through collective_rpc."""

    def steer_plugin_stats(self) -> dict | None:
        """Cumulative worker figures for /metrics (Steerer.stats: a WorkerStats, sent as its wire dict), or None
        on a worker without a steerer."""
        steerer = steerer_of(self)
        return steerer.stats().wire() if steerer is not None else None

    def steer_plugin_load(self, command: dict) -> dict:
        """One runtime load or unload from the admin API (a LoadCommand's wire dict); its LoadOutcome's wire
        dict. The messages cross vLLM's collective_rpc as plain dicts (steer_plugin.messages)."""
        steerer = steerer_of(self)
        if steerer is None:
            raise NoSteererError("this worker has no steering config, so nothing can be loaded at runtime")
        return steerer.runtime_loads.command(command).wire()


def is_extension(cls: type | None) -> bool:
    """Whether `cls` provides the extension (it is SteerWorkerExtension, or a user's class composed with it)."""
    return isinstance(cls, type) and issubclass(cls, SteerWorkerExtension)
