"""The runtime loads as every worker records them: the server's one record of what is loaded at runtime.

Every worker gets every LoadCommand, in the one order the engine core sends them (vLLM's collective_rpc runs
one call at a time on every TP and PP rank), and records every committed load whether or not it owns the
source's layer, so every worker's registry is the same. That makes it the single source of truth of the admin
API however many API server processes the server runs (each holds only a copy: steer_plugin/catalog_sync.py):

- an id configured at start-up or loaded is refused (409) when staged and again when committed, whatever layer
  the load names, so two loads of one id through two API processes never both succeed;
- an id another load is reading (staged under another revision) is refused when staged (409);
- an unload names the revision its API process saw: a source unloaded or loaded again since is left alone
  (404, 409), and a rollback only ever undoes its own load;
- `generation` counts the load and unload commands run (whatever their outcome, so it is the same on every
  worker): an API process whose copy was built at the registry's generation is current.
"""

from __future__ import annotations

from collections.abc import Iterable

from steer_plugin.config import SteerConfig
from steer_plugin.messages import LoadCommand, LoadOutcome, RuntimeEntry


def configured_ids(config: SteerConfig) -> frozenset[tuple[str, str]]:
    """(kind, id) of every source the configuration names (every layer, not only this worker's)."""
    return frozenset(
        [("sae", s.id) for s in config.saes]
        + [("vector", v.id) for v in config.vectors]
        + [("probe", p.id) for p in config.probes]
    )


def _conflict(message: str) -> LoadOutcome:
    return LoadOutcome(False, status=409, error=message, field="id")


class LoadRegistry:
    def __init__(self, configured: frozenset[tuple[str, str]]):
        self.configured = configured
        self.entries: dict[tuple[str, str], RuntimeEntry] = {}  # (kind, id) -> its load, in load order
        self.generation = 0

    def load_refusal(self, cmd: LoadCommand, staged: Iterable[tuple[str, str, str]]) -> LoadOutcome | None:
        """Why a stage or a commit of `cmd` may not go on, or None. `staged`: (kind, id, revision) read."""
        key = (cmd.kind, cmd.id)
        if key in self.configured or key in self.entries:
            return _conflict(f"{cmd.kind} {cmd.id!r} is already loaded")
        if cmd.action == "stage" and any(k[:2] == key and k[2] != cmd.revision for k in staged):
            return _conflict(f"{cmd.kind} {cmd.id!r} is being loaded")
        return None

    def unload_refusal(self, cmd: LoadCommand) -> LoadOutcome | None:
        key = (cmd.kind, cmd.id)
        entry = self.entries.get(key)
        if entry is None:
            if key in self.configured:
                return _conflict(f"{cmd.kind} {cmd.id!r} is configured at start-up; it cannot be unloaded")
            return LoadOutcome(False, status=404, error=f"no {cmd.kind} {cmd.id!r} is loaded", field="id")
        if cmd.revision and cmd.revision != entry.revision:
            return _conflict(f"{cmd.kind} {cmd.id!r} was loaded again since (revision {entry.revision})")
        return None

    def committed(self, cmd: LoadCommand) -> None:
        self.entries[(cmd.kind, cmd.id)] = RuntimeEntry(
            cmd.kind, cmd.id, cmd.revision, dict(cmd.source or {})
        )

    def unloaded(self, cmd: LoadCommand) -> None:
        self.entries.pop((cmd.kind, cmd.id), None)

    def stamped(self, outcome: LoadOutcome) -> LoadOutcome:
        """`outcome` carrying the registry as it is now."""
        return outcome._replace(generation=self.generation, entries=tuple(self.entries.values()))
