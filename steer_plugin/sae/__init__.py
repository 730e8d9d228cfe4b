"""Sparse autoencoders: the shared in-memory layout and loaders for every published checkpoint format."""

from __future__ import annotations

from .errors import SAELoadError
from .formats import FORMATS
from .loading import detect_format, load_sae
from .model import SAEMetadata, SparseAutoencoder

__all__ = ["FORMATS", "SAELoadError", "SAEMetadata", "SparseAutoencoder", "detect_format", "load_sae"]
