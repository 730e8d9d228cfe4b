"""Running the V2 test modules under a side venv's vLLM (a subprocess pytest) and judging what came back.

The inner run's outcomes come from report_plugin.py (JSON). The verdict fails on: any failed or erroring test, an
XPASS of a strict xfail, a skip not tagged `[not in this vLLM]` (inside a side venv every kernel-dependent test must
run), an inner run under another vLLM than asked for or without its kernels, and a run that collected nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from tests.adapters.runner_v2.report_plugin import REPORT_ENV
from tests.adapters.runner_v2.summary import NOT_IN_THIS_VLLM
from tools.vllm_side import SideVenv, side_env

REPO = Path(__file__).resolve().parents[3]
# The modules built on the harness: each runs in-process here and again under every side venv.
V2_MODULES = (
    "tests/adapters/test_v2_harness.py",
    "tests/adapters/test_runner_v2.py",
    "tests/adapters/test_v2_logits.py",
    "tests/adapters/test_v2_abort.py",
    "tests/adapters/test_v2_steering.py",
    "tests/adapters/test_prefix_salt.py",
    "tests/adapters/test_compile_key.py",
)
INNER_TIMEOUT_S = 1500
_DETAIL_CHARS = 1500


class InnerRun(NamedTuple):
    version: str  # asked for
    vllm: dict  # what ran: version, kernels_run, describe
    results: list[dict]  # nodeid, when, outcome, detail
    exitstatus: int
    seconds: float
    output: str  # the inner pytest's stdout+stderr

    def of(self, *outcomes: str) -> list[dict]:
        return [r for r in self.results if r["outcome"] in outcomes]

    @property
    def tagged_skips(self) -> list[dict]:
        return [r for r in self.of("skipped") if NOT_IN_THIS_VLLM in r["detail"]]

    def counts(self) -> str:
        counts = Counter(r["outcome"] for r in self.results)
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))

    def problems(self) -> list[str]:
        out = []
        if not self.vllm:
            return [f"the inner pytest wrote no report (exit {self.exitstatus}):\n{self.output[-6000:]}"]
        if not self.vllm.get("version", "").startswith(self.version):
            out.append(f"the inner run imported vLLM {self.vllm.get('version')}, not {self.version}")
        if not self.vllm.get("kernels_run"):
            out.append(f"the inner run did not run vLLM's kernels ({self.vllm.get('describe')})")
        if not self.of("passed"):
            out.append("the inner run passed no test")
        for r in self.of("failed", "error"):
            out.append(f"FAILED {r['nodeid']} ({r['when']}):\n{_tail(r['detail'])}")
        for r in self.of("xpassed"):
            out.append(f"XPASS(strict) {r['nodeid']}: {r['detail']} (fixed? drop the xfail for this version)")
        for r in self.of("skipped"):
            if r not in self.tagged_skips:
                out.append(f"SKIPPED {r['nodeid']}: {r['detail']} (a side venv must run it)")
        return out

    def summary(self) -> str:
        lines = [
            f"vLLM {self.version} side run: {self.counts()} in {self.seconds:.0f}s ({self.vllm.get('describe')})"
        ]
        lines += [f"  xfail {r['nodeid']}: {r['detail']}" for r in self.of("xfailed")]
        lines += [f"  skipped {r['nodeid']}: {r['detail']}" for r in self.tagged_skips]
        return "\n".join(lines)


def _tail(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else "..." + text[-_DETAIL_CHARS:]


def run_modules(side: SideVenv, report: Path, modules: tuple[str, ...] = V2_MODULES) -> InnerRun:
    """`python -m pytest MODULES` with the side venv's python, from the repository root."""
    env = side_env(dict(os.environ), REPO)
    env[REPORT_ENV] = str(report)
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [str(side.python), "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += ["-p", "tests.adapters.runner_v2.report_plugin", *modules]
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - start
    data = json.loads(report.read_text()) if report.exists() else {"vllm": {}, "results": []}
    return InnerRun(
        side.version, data["vllm"], data["results"], proc.returncode, seconds, proc.stdout + proc.stderr
    )


if (
    __name__ == "__main__"
):  # pragma: no cover - a manual look: python -m tests.adapters.runner_v2.side_runs 0.34.0
    from tools.vllm_side import ensure

    for version in sys.argv[1:]:
        run = run_modules(ensure(version), Path(f"/tmp/inner-{version}.json"))
        print(run.summary())
        print("\n".join(run.problems()) or "ok")
