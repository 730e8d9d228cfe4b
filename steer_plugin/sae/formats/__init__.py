"""On-disk SAE formats, each converted to the shared `SparseAutoencoder` layout.

One module per format, each with `detect(path) -> bool` and a loader, registered here in detection order.
`load_sae` (../loading.py) is the entry point; `register_format` adds a format from outside.
"""

from __future__ import annotations

from . import (
    dictionary_learning,
    gemma_scope,
    gemma_scope_2,
    goodfire,
    llama_scope,
    openai,
    saelens,
    sparsify,
)
from .registry import REGISTRY, SAEFormat, format_names, register_format

for _module in (
    saelens,
    gemma_scope,
    gemma_scope_2,
    sparsify,
    openai,
    dictionary_learning,
    llama_scope,
    goodfire,
):
    register_format(_module.FORMAT)

FORMATS: tuple[str, ...] = format_names()
"""Names of the built-in formats."""

__all__ = ["FORMATS", "REGISTRY", "SAEFormat", "format_names", "register_format"]
