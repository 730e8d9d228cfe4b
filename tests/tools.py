"""System tools that some tests need (Debian packages that scripts/setup_system.sh installs)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """The path of `name` on PATH. Missing: the test skips, except in CI, where it fails naming the package."""
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` not on PATH: install Debian's `{package}` package (bash scripts/setup_system.sh)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path
