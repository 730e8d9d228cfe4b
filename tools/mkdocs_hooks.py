"""MkDocs hooks (mkdocs.yml `hooks:`): the generated reference pages, written into docs/reference/ before the files
are collected, so every build documents the code it is built from."""

from __future__ import annotations

import sys
from pathlib import Path

# MkDocs loads this file by path: the repository root makes `tools` importable (and the packages, in a checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import config_reference, openapi_reference  # noqa: E402


def on_pre_build(config, **kwargs) -> None:
    reference = Path(config["docs_dir"]) / "reference"
    reference.mkdir(exist_ok=True)
    (reference / "configuration.md").write_text(config_reference.page())
    (reference / "openapi.md").write_text(openapi_reference.page())
