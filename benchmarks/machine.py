"""What the benchmarks record about the machine and the code they measured."""

from __future__ import annotations

import datetime as dt
import os
import platform
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
            ["git", "status", "--porcelain", "--", "steer_plugin", "steer_adapters"],
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


def machine_info() -> dict:
    """The machine, the vLLM and torch of this process, the commit, and when (serve_bench's `machine` record)."""
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("vllm", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - report, don't fail
            versions[mod] = f"unavailable ({type(err).__name__})"
    commit, dirty = git_state()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_gib": mem_gib,
        "vllm": versions["vllm"],
        "torch": versions["torch"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "uncommitted_engine_files": dirty,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }
