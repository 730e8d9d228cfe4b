"""Sparse autoencoders: the shared in-memory layout and loaders for every published checkpoint format."""

from __future__ import annotations

from .errors import SAELoadError
from .formats import FORMATS
from .loading import detect_format, load_sae, read_sae_header
from .model import SAEHeader, SAEMetadata, SparseAutoencoder

__all__ = [
    "FORMATS",
    "SAEHeader",
    "SAELoadError",
    "SAEMetadata",
    "SparseAutoencoder",
    "detect_format",
    "load_sae",
    "read_sae_header",
]
