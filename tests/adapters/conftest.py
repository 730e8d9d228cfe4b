"""The side-venv runs of the Model Runner V2 tests (test_v2_side_versions.py) report here, after the test summary:
whether each side venv was built (cold cache, and how long) or cached, and each inner run's counts, xfails and
version skips."""

from __future__ import annotations

import pytest

from tests.adapters.runner_v2 import summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if summary.LINES:
        terminalreporter.section("vLLM side venvs (Model Runner V2 tests under other vLLM versions)")
        for line in summary.LINES:
            terminalreporter.write_line(line)
