"""What the side-venv runs report at the end of the pytest session (tests/adapters/conftest.py prints LINES in the
terminal summary, which `-q -rs` runs show too). No imports: the conftest reads it without importing vLLM."""

from __future__ import annotations

LINES: list[str] = []
# Skips with this prefix are about what a vLLM version does not have at all (e.g. Model Runner V1 in 0.34): the
# side-version runs report them and do not fail on them; they fail on any other skip.
NOT_IN_THIS_VLLM = "[not in this vLLM]"
