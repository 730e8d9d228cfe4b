"""tools/vllm_side.py (side venvs) and runner_v2/side_runs.py (judging an inner run), without the network: a side
venv is built for real from a small fake `vllm` wheel (compiled parts included, to be left out) and a fake Triton,
and must import that vllm ahead of the shared venv's while torch still comes from the shared venv; it is cached,
rebuilt when its recipe changes (the stale one removed), and built once when two builders race."""

from __future__ import annotations

import json
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.adapters.runner_v2.side_runs import InnerRun
from tests.adapters.runner_v2.summary import NOT_IN_THIS_VLLM
from tools import check_internals, vllm_side

FAKE = "9.9.9"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    wheels, side = tmp_path / "wheels", tmp_path / "side"
    wheels.mkdir()
    wheel = wheels / f"vllm-{FAKE}-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm/__init__.py", f"__version__ = {FAKE!r}\n")
        z.writestr("vllm/v1/worker/gpu/model_runner.py", "class GPUModelRunner: ...\n")
        z.writestr("vllm/_C.abi3.so", b"\x7fELF compiled")
        z.writestr("vllm/vllm-rs", b"\x7fELF binary")
        z.writestr("vllm/csrc/ops.cuh", "// CUDA header\n")
        z.writestr(f"vllm-{FAKE}.dist-info/METADATA", f"Name: vllm\nVersion: {FAKE}\n")
    monkeypatch.setenv(check_internals.CACHE_ENV, str(wheels))
    monkeypatch.setenv(vllm_side.CACHE_ENV, str(side))
    monkeypatch.setattr(vllm_side, "fetch_wheel", lambda v: check_internals.Fetched(wheel, True, 0.1))

    def fake_triton(cache: Path) -> tuple[Path, bool]:
        target = vllm_side.triton_dir(cache)
        (target / "triton").mkdir(parents=True, exist_ok=True)
        (target / "triton" / "__init__.py").write_text("__version__ = 'fake'\n")
        (target / vllm_side.STAMP).write_text("{}")
        return target, True

    monkeypatch.setattr(vllm_side, "_ensure_triton", fake_triton)
    return side


def side_python_says(side: vllm_side.SideVenv, code: str) -> str:
    env = vllm_side.side_env({"PATH": "/usr/bin:/bin"}, vllm_side.REPO)
    return subprocess.run(
        [str(side.python), "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


def test_side_venv_shadows_vllm_and_keeps_the_shared_packages(caches):
    messages = []
    side = vllm_side.ensure(FAKE, on_build=messages.append)
    assert side.built and messages[0].startswith(f"building the vllm {FAKE} side venv")
    site = side.path / "lib"
    assert not list(site.rglob("*.so")) and not list(site.rglob("vllm-rs")) and not list(site.rglob("*.cuh"))
    out = side_python_says(
        side,
        "import importlib.metadata as m, vllm, torch, triton; "
        "print(vllm.__version__, m.version('vllm'), vllm.__file__, torch.__file__, triton.__version__)",
    )
    version, dist, vllm_file, torch_file, triton = out.split()
    assert (version, dist, triton) == (FAKE, FAKE, "fake")
    assert vllm_file.startswith(str(side.path)) and not torch_file.startswith(str(side.path))
    assert json.loads((side.path / vllm_side.STAMP).read_text())["vllm"] == FAKE


def test_cached_then_rebuilt_when_the_recipe_changes(caches, monkeypatch):
    first = vllm_side.ensure(FAKE)
    again = vllm_side.ensure(FAKE)
    assert again.path == first.path and not again.built and again.seconds == 0.0
    monkeypatch.setattr(vllm_side, "RECIPE", vllm_side.RECIPE + 1)
    rebuilt = vllm_side.ensure(FAKE)
    assert rebuilt.built and rebuilt.path != first.path
    assert not first.path.exists()  # the stale venv is gone


def test_an_unfinished_build_is_redone(caches):
    side = vllm_side.ensure(FAKE)
    (side.path / vllm_side.STAMP).unlink()  # as if the build had been interrupted before its last step
    assert vllm_side.ensure(FAKE).built


def test_two_builders_at_once_build_once(caches):
    with ThreadPoolExecutor(2) as pool:
        sides = list(pool.map(lambda _: vllm_side.ensure(FAKE, on_build=lambda m: None), range(2)))
    assert sorted(s.built for s in sides) == [False, True]
    assert sides[0].path == sides[1].path


# --- judging an inner run -------------------------------------------------------------------------------------------

VLLM = {
    "version": "0.34.0",
    "kernels_run": True,
    "describe": "vLLM 0.34.0: Triton kernels interpreted on CPU",
}


def run(*results, vllm=VLLM):
    rows = [dict(nodeid=n, when="call", outcome=o, detail=d) for n, o, d in results]
    return InnerRun("0.34.0", vllm, rows, 0, 1.0, "")


def test_a_clean_run_has_no_problems_and_reports_xfails_and_version_skips():
    inner = run(
        ("t::a", "passed", ""),
        ("t::x", "xfailed", "glue: why"),
        ("t::v1", "skipped", f"{NOT_IN_THIS_VLLM} V1"),
    )
    assert inner.problems() == []
    assert "t::x: glue: why" in inner.summary() and "t::v1" in inner.summary()


@pytest.mark.parametrize(
    "bad, says",
    [
        (("t::f", "failed", "assert 1 == 2"), "FAILED t::f (call):\nassert 1 == 2"),
        (("t::e", "error", "fixture broke"), "FAILED t::e"),
        (("t::s", "skipped", "needs kernels"), "SKIPPED t::s: needs kernels (a side venv must run it)"),
        (("t::p", "xpassed", "glue: why"), "XPASS(strict) t::p"),
    ],
)
def test_failures_skips_and_xpasses_are_problems(bad, says):
    problems = run(("t::a", "passed", ""), bad).problems()
    assert len(problems) == 1 and problems[0].startswith(says)


def test_wrong_vllm_no_kernels_or_nothing_run_are_problems():
    assert (
        "imported vLLM 0.33.0"
        in run(("t::a", "passed", ""), vllm={**VLLM, "version": "0.33.0"}).problems()[0]
    )
    assert (
        "did not run vLLM's kernels"
        in run(("t::a", "passed", ""), vllm={**VLLM, "kernels_run": False}).problems()[0]
    )
    assert run(("t::s", "skipped", f"{NOT_IN_THIS_VLLM} x")).problems() == ["the inner run passed no test"]
    assert "wrote no report" in InnerRun("0.34.0", {}, [], 4, 1.0, "boom").problems()[0]
