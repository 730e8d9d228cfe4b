"""The documentation: the MkDocs site builds in strict mode (a broken link, a missing page or a page left out of
the nav fails), its generated reference pages cover the code they document, and the README stays an entrance
(at most 200 lines, every link it has to a file of the repository resolves)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import require_module

REPO = Path(__file__).resolve().parents[1]


def test_site_builds_in_strict_mode(tmp_path):
    require_module("mkdocs", "pip install -e .[docs]")
    require_module("material", "pip install -e .[docs]")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(REPO / "mkdocs.yml"),
            "-d",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for page in ("reference/configuration/index.html", "reference/openapi/index.html", "api/index.html"):
        assert (tmp_path / page).is_file(), page


def test_configuration_reference_names_every_field():
    from steer_plugin.config import SteerConfig
    from tools import config_reference

    page = config_reference.page()
    for model in config_reference._models(SteerConfig):
        for key, field in model.model_fields.items():
            assert f"| `{key}` |" in page, f"{model.__name__}.{key}"
            assert field.description, f"{model.__name__}.{key} has no docstring"


def test_openapi_reference_has_the_steering_schema_and_admin_routes():
    from tools import openapi_reference

    doc = openapi_reference.document()
    assert "SteeringSpec" in doc["components"]["schemas"]
    assert {"/v1/steering/saes", "/v1/steering/vectors", "/v1/steering/probes"} <= set(doc["paths"])
    assert {"/v1/steering/probes:fit", "/v1/steering/vectors:fit"} <= set(doc["paths"])


def test_readme_is_an_entrance():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if not t.startswith("http") and not (REPO / t).exists()]
    assert targets and not missing, missing


@pytest.mark.parametrize("path", sorted((REPO / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_page_is_in_the_nav(path):
    nav = (REPO / "mkdocs.yml").read_text()
    assert f": {path.name}" in nav
