"""What both benchmark harnesses record about the machine and the code they measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_state() -> tuple[str, list[str]]:
    """(short commit, engine/adapter .py files with uncommitted changes)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "steer_plugin", "adapters"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout
    except OSError:
        return "", []
    return commit, sorted(line[3:] for line in status.splitlines() if line[3:].endswith(".py"))


def date_and_commit_line(machine: dict) -> str:
    """The report line naming when and from which commit a run was taken (and how many engine files differed)."""
    dirty = machine.get("uncommitted_engine_files")
    return f"- Date: {machine['date_utc']}; git {machine['git_commit'] or '?'}" + (
        f" with {len(dirty)} uncommitted engine/adapter files" if dirty else ""
    )
