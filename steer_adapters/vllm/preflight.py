"""The start-up check of the installed vLLM: each process checks the entries of internals.py that its own part of
the adapter relies on (modules it imports anyway, so the check costs no extra imports) before it hooks anything,
and refuses to start, listing what moved, when one does not match. A vLLM version that vllm-versions.txt does not
name but that passes the check starts with a warning.

- engine core: engine_core.py's entries, when it patches the prefix cache (every process, at plugin load);
- worker: worker/'s entries, when a worker starts (install.patch_workers' init_device);
- API server: api/'s entries, when the middleware is built (before the server answers anything).
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from steer_adapters.vllm.internals import ALL, Internal
from steer_adapters.vllm.internals_check import check_installed
from steer_adapters.vllm.versions import checked_vllm_versions

logger = logging.getLogger("steer_plugin")

Process = Literal["engine_core", "worker", "api"]
# The adapter module named first in an entry's `used_by` ("install.patch_workers") -> the process that runs it.
PROCESS_OF_MODULE: dict[str, Process] = {
    "engine_core": "engine_core",
    "install": "worker",
    "runner_v1": "worker",
    "runner_v2": "worker",
    "abort": "worker",
    "extension": "worker",
    "engine": "api",
    "auth": "api",
    "serve": "api",
    "middleware": "api",
    "launcher": "api",
    "service": "api",
}
_checked: set[str] = set()


class VllmMoved(RuntimeError):
    """The installed vLLM lacks something the adapter relies on (the message lists each)."""


def processes_of(internal: Internal) -> set[Process]:
    """Every process whose part of the adapter uses the entry (its `used_by` names them)."""
    modules = re.findall(r"\b([a-z_0-9]+)\.[A-Za-z_]", internal.used_by)
    return {PROCESS_OF_MODULE[m] for m in modules if m in PROCESS_OF_MODULE}


def entries_of(process: Process) -> tuple[Internal, ...]:
    return tuple(i for i in ALL if process in processes_of(i))


def check(process: Process) -> None:
    """Once per process: VllmMoved naming every entry of `process` that moved in the installed vLLM."""
    if process in _checked:
        return
    report = check_installed(entries_of(process))
    if not report.ok:
        raise VllmMoved(
            "steer_plugin cannot run on this vLLM; refusing to start:\n  "
            + "\n  ".join(report.lines())
            + "\nInstall a vLLM that steer_adapters/vllm/vllm-versions.txt names (scripts/setup.sh does)."
        )
    _checked.add(process)
    if not _checked - {process}:  # the first check in this process: say once whether the version is pinned
        warn_unpinned(report.version)


def is_pinned(version: str) -> bool:
    """`0.32.0+cpu` matches a pin of 0.32.0: the local suffix only names the build."""
    return version.split("+", 1)[0] in checked_vllm_versions()


def warn_unpinned(version: str) -> None:
    if not is_pinned(version):
        logger.warning(
            "steer_plugin: vLLM %s is not one the adapter is checked against (%s); every internal it relies on is "
            "in place, so it starts, at your own risk",
            version,
            ", ".join(checked_vllm_versions()),
        )
