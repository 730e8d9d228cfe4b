"""A pytest plugin for the inner runs of test_v2_side_versions.py: writes each test's outcome (and the vLLM that ran
it) as JSON to $STEER_INNER_REPORT, so the outer test can name failures, skips and xfails exactly.

    python -m pytest -p tests.adapters.runner_v2.report_plugin MODULES...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPORT_ENV = "STEER_INNER_REPORT"
_results: list[dict] = []


def _outcome(report: pytest.TestReport) -> str | None:
    if hasattr(report, "wasxfail"):
        return "xpassed" if report.passed else "xfailed"
    if report.when == "call" or report.failed or report.skipped:
        return "error" if report.failed and report.when != "call" else report.outcome
    return None  # a passing setup or teardown


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome = _outcome(report)
    if outcome is None:
        return
    if report.skipped and not hasattr(report, "wasxfail"):
        detail = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    elif hasattr(report, "wasxfail"):
        detail = report.wasxfail
    else:
        detail = report.longreprtext
    _results.append({"nodeid": report.nodeid, "when": report.when, "outcome": outcome, "detail": detail})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _results.append(
            {"nodeid": report.nodeid, "when": "collect", "outcome": "error", "detail": report.longreprtext}
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    from tests.adapters.runner_v2 import vllm_env

    vllm = {
        "version": vllm_env.VERSION_TEXT,
        "kernels_run": vllm_env.KERNELS_RUN,
        "describe": vllm_env.describe(),
    }
    Path(path).write_text(json.dumps({"vllm": vllm, "exitstatus": int(exitstatus), "results": _results}))
