"""What some tests need from the environment (Debian packages that scripts/setup_system.sh installs, Python
packages of the `test` extra and requirements/test-extra.txt, the built demo assets). Missing: the test skips,
except in CI (`CI=true`, where scripts/test.sh installs and builds everything), where it fails naming what is
missing, so that a missing dependency never hides a test there."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message: str) -> NoReturn:
    """Skip the test; in CI, fail it."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    """The path of `name` on PATH (else skip, or fail in CI, naming the Debian package)."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(
            f"`{name}` not on PATH: install Debian's `{package}` package (bash scripts/setup_system.sh)"
        )
    return path


def require_module(name: str, install: str) -> ModuleType:
    """The imported module `name` (else skip, or fail in CI, saying how to install it)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        skip_or_fail(f"cannot import {name!r} ({err}): {install}")
