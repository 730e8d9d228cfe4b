"""The built wheel: every file of steer_plugin/, steer_adapters/ and steer_demo/ is in it, plus the
entry points.

A non-editable install (`pip install .`, the one deploy/k8s prescribes) gets only what the wheel holds; a package
missing from it imports fine from the source tree and fails only there. The wheel is built from a clean copy of
the build inputs, so that a stale build/ folder cannot hide a missing package.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> import name
TREES = {"steer_plugin": "steer_plugin", "steer_adapters": "steer_adapters", "steer_demo": "steer_demo"}
BUILD_INPUTS = ["pyproject.toml", "README.md"]


def _source_files() -> set[str]:
    """Every file of every tree, by its path in the wheel (byte-code caches left out)."""
    names = set()
    for folder, name in TREES.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                names.add(f"{name}/{path.relative_to(REPO / folder).as_posix()}")
    return names


def _local_setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 (the project needs >= 68; bdist_wheel is built in from 70.1, no `wheel` package)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = re.match(r"(\d+)\.(\d+)", version)
    return parts is not None and (int(parts[1]), int(parts[2])) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        shutil.copy2(REPO / name, src / name)
    for folder in TREES:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)]
    if _local_setuptools_builds_wheels():
        cmd.append("--no-build-isolation")  # the venv's own setuptools: no package index needed, and faster
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (path,) = (tmp / "dist").glob("steer_plugin-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def _dist_info(zf: zipfile.ZipFile) -> str:
    (folder,) = {n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info")}
    return folder


def test_every_source_file_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    expected = _source_files()
    assert "steer_plugin/monitor/__init__.py" in expected  # the package the hand-kept list once missed
    missing = sorted(expected - names)
    assert not missing, (
        f"not in the wheel (a folder without __init__.py, or a data file not declared): {missing}"
    )


def test_wheel_holds_only_the_three_packages(wheel):
    top = {n.split("/")[0] for n in wheel.namelist()}
    assert top == {"steer_plugin", "steer_adapters", "steer_demo", _dist_info(wheel)}
    extra = sorted(
        n for n in wheel.namelist() if not n.startswith(_dist_info(wheel)) and n not in _source_files()
    )
    assert not extra, f"in the wheel but not in the source tree (stale build output?): {extra}"


def test_entry_points(wheel):
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(f"{_dist_info(wheel)}/entry_points.txt").decode())
    assert dict(parser["vllm.general_plugins"]) == {"steer_plugin": "steer_adapters.vllm.plugin:register"}
    assert parser["console_scripts"]["steer-serve"] == "steer_adapters.vllm.api.launcher:main"
    assert parser["console_scripts"]["steer-serve-demo"] == "steer_demo.serve:main"
    assert parser["console_scripts"]["steer-build-assets"] == "steer_demo.build_assets:main"
