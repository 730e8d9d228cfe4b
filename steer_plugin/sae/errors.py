"""Errors raised while reading SAE checkpoints."""

from __future__ import annotations

from pathlib import Path


class SAELoadError(ValueError):
    """An SAE checkpoint could not be loaded: unknown format, missing or malformed file, tensor or config key.

    The message always names the file (or folder) at fault; `path` holds it too.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None
