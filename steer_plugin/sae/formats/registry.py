"""The table of known SAE formats: name -> how to recognise its files and how to load them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..model import SparseAutoencoder


@dataclass(frozen=True)
class SAEFormat:
    """One on-disk SAE format."""

    name: str
    """Short name, used by `load_sae(format=...)` and stored in `metadata.format`."""
    summary: str
    """One line: which files make up the format."""
    detect: Callable[[Path], bool]
    """True when `path` (a file or folder) looks like this format. Must not unpickle anything."""
    load: Callable[..., SparseAutoencoder]
    """`load(path, *, allow_pickle: bool, **format_kwargs)` -> SparseAutoencoder in the shared layout.
    `read_sae_header` runs it under `_io.shapes_only()`: tensors read through `_io` are then meta tensors (no
    data), so it must not branch on the values of tensors of more than one element (or skip that for meta)."""


REGISTRY: dict[str, SAEFormat] = {}


def register_format(fmt: SAEFormat, *, replace: bool = False) -> SAEFormat:
    """Add a format to the registry (detection tries formats in registration order)."""
    if fmt.name in REGISTRY and not replace:
        raise ValueError(f"SAE format {fmt.name!r} is already registered")
    REGISTRY[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(REGISTRY)
