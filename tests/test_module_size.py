"""No module of the runtime (steer_plugin/, steer_adapters/) is over 400 lines: one module, one job, read top to
bottom. Benchmarks, tools and tests are not held to it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_no_runtime_module_is_over_400_lines():
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for folder in ("steer_plugin", "steer_adapters")
        for path in (REPO / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert len(sizes) > 40  # the scan sees the package
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
