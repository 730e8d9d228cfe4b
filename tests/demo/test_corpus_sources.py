"""The demo corpus reads only text pinned by a version: never the machine's /usr/share, home or caches.

Cheap (a few seconds, no built assets, no torch): every non-chat source of ``steer_demo.corpus`` runs
in a subprocess under an audit hook that records every file it opens and every folder it lists, with
``ast.parse`` stubbed out (every file is still read, none is parsed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from steer_demo import corpus
from steer_demo.common import BUILD_PACKAGES

REPO_ROOT = (
    Path(__file__).resolve().parents[2]
)  # the checkout (also when steer_plugin is installed as a wheel)

AUDIT_SCRIPT = r"""
import ast, json, os, sys
from steer_demo import corpus

events = []
recording = [False]

def hook(event, args):
    if recording[0] and event in ("open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile"):
        path = args[0] if args else None
        if isinstance(path, (str, bytes, os.PathLike)):
            events.append([event, os.path.abspath(os.fsdecode(path))])

sys.addaudithook(hook)
ast.parse = lambda *a, **k: ast.Module(body=[], type_ignores=[])  # read every file, parse none (fast)
recording[0] = True
counts = {name: len(fn()) for name, fn in corpus.text_pools().items()}
versions = corpus.source_versions()
recording[0] = False
print(json.dumps({"events": events, "counts": counts, "versions": versions}))
"""

FORBIDDEN = [Path("/usr/share"), Path("/usr/local/share"), Path("/etc"), Path("/var"), Path("/tmp")]


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@pytest.fixture(scope="module")
def audit() -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO_ROOT),
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _allowed_roots() -> list[Path]:
    """The interpreter's installation (its stdlib; imports also probe e.g. ``lib/python3X.zip``) and the
    environment's site-packages (where the pinned wheels live)."""
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    return sorted(roots)


def test_sources_never_touch_machine_dependent_locations(audit):
    opened = [Path(p).resolve() for ev, p in audit["events"] if ev == "open"]
    assert len(opened) > 100, "the audit hook saw (almost) no reads: the check would have no power"
    roots = _allowed_roots()
    for ev, p in audit["events"]:
        path = Path(p).resolve()
        # The interpreter and the venv may live anywhere (a checkout under /tmp, say), and imports list the
        # checkout's root (sys.path's ""): those are not machine-dependent text.
        if any(_under(path, r) for r in roots) or (ev != "open" and path == REPO_ROOT):
            continue
        for bad in FORBIDDEN:
            assert not _under(path, bad), f"{ev} {path}: corpus text must not depend on {bad}"
    home_cache = Path.home() / ".cache"
    outside = sorted({str(p) for p in opened if not any(_under(p, r) for r in roots)})
    assert not outside, f"corpus sources read files outside the stdlib / site-packages: {outside[:10]}"
    assert not any(_under(p, home_cache.resolve()) for p in opened)


def test_every_source_contributes(audit):
    counts = audit["counts"]
    assert set(counts) | {"chat"} == set(corpus.DEFAULT_BUDGETS) | {"chat"}
    # ast.parse is stubbed in the audit, so the docstring sources are empty there; the others are not.
    for name in ("python_reference", "licenses", "package_readmes"):
        assert counts[name] > 0, f"source {name} produced nothing"


def test_source_code_names_no_machine_doc_folder():
    text = Path(corpus.__file__).read_text(encoding="utf-8")
    code = re.sub(r'"""[\s\S]*?"""', "", text)  # docstrings may mention what is *not* read
    assert "/usr/share" not in code and "expanduser" not in code and "Path.home" not in code


def _hf_extra_pins() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {}
    for req in data["project"]["optional-dependencies"]["hf"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)\s*", req)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_text_and_build_packages_are_pinned_exactly():
    pins = _hf_extra_pins()
    for name in corpus.TEXT_PACKAGES:
        assert name in pins, f"corpus text package {name} must be pinned with == in pyproject's hf extra"
    for name in ("transformers", "tokenizers", "gguf", "accelerate"):
        assert name in BUILD_PACKAGES and name in pins, f"{name} must be pinned with == in the hf extra"


def test_installed_text_packages_match_the_pins(audit):
    """Other versions build other (valid) assets; the recorded quality numbers are for the pinned ones."""
    pins = _hf_extra_pins()
    installed = audit["versions"]["packages"]
    for name in corpus.TEXT_PACKAGES:
        assert installed[name] == pins[name], f"{name} {installed[name]} installed, {pins[name]} pinned"


def test_corpus_stage_fingerprint_records_versions(tmp_path):
    from steer_demo.build_assets import _stages

    stages = _stages(tmp_path)
    params = stages["corpus"].params
    assert params["text_sources"] == corpus.source_versions()
    assert params["text_sources"]["python"].endswith(".".join(map(str, sys.version_info[:3])))
    env = stages["model"].params["env"]
    assert set(BUILD_PACKAGES) <= set(env) and env["python"] == params["text_sources"]["python"]
