"""The Model Runner V2 test modules (runner_v2/side_runs.py V2_MODULES) under each side venv's vLLM: the `gpu vllm`
pins of steer_adapters/vllm/vllm-versions.txt (0.34.0 and 0.33.0 today;
STEER_V2_SIDE_VERSIONS=0.34.0,... names others).

Each test gets (or builds, once per machine: tools/vllm_side.py) the side venv whose `vllm` is that CUDA wheel's
Python code beside the shared venv's torch 2.13 CPU, then runs the modules there with `python -m pytest` in a
subprocess (PYTHONPATH = the repository, Triton's interpreter on, so vLLM's kernels and Sampler run). It fails with
the inner failures (test names and their assertion text), on an XPASS of a strict xfail, and on any inner skip not
tagged `[not in this vLLM]`; the terminal summary lists each venv (cached, or built and how long it took), the
inner counts, xfails and tagged skips. A cold build is announced live while it runs.

Marked `side_venv` (deselect with `-m "not side_venv"`). Without a side venv that can be built (no network), the
test skips; under CI=true it fails.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.adapters.runner_v2 import side_runs, summary
from tests.tools import skip_or_fail
from tools import vllm_side

VERSIONS_ENV = "STEER_V2_SIDE_VERSIONS"


def side_versions() -> tuple[str, ...]:
    named = os.environ.get(VERSIONS_ENV, "")
    return tuple(v.strip() for v in named.split(",") if v.strip()) or vllm_side.default_versions()


def live_printer(config: pytest.Config) -> Callable[[str], None]:
    """Prints past pytest's output capture, so a cold build shows while it runs."""
    capture = config.pluginmanager.getplugin("capturemanager")
    terminal = config.pluginmanager.getplugin("terminalreporter")

    def say(message: str) -> None:
        summary.LINES.append(message)
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"\n[vllm-side] {message}")

    return say


@pytest.mark.side_venv
@pytest.mark.parametrize("version", side_versions())
def test_v2_modules_under_side_vllm(version, pytestconfig, tmp_path):
    start = time.monotonic()
    try:
        side = vllm_side.ensure(version, on_build=live_printer(pytestconfig))
    except (subprocess.SubprocessError, OSError, RuntimeError) as err:
        skip_or_fail(
            f"cannot build the vLLM {version} side venv ({err}); try: python -m tools.vllm_side {version}"
        )
    state = f"cold cache: built in {side.seconds:.0f}s" if side.built else "cached"
    if not side.built:
        summary.LINES.append(f"{side.describe()} [{state}, found in {time.monotonic() - start:.1f}s]")
    run = side_runs.run_modules(side, tmp_path / "inner.json")
    summary.LINES.append(run.summary())
    problems = run.problems()
    if problems:
        pytest.fail(f"vLLM {version} ({state}): {run.counts()}\n\n" + "\n\n".join(problems), pytrace=False)
