"""The CPU monitor: CPU time used by processes other than a benchmark's own servers and itself, from /proc.

A benchmark on a shared machine measures this around every timed unit (and may wait for a quiet machine before
one): a unit during which other processes used more than a threshold of cores is marked disturbed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

HZ = os.sysconf("SC_CLK_TCK")


class CpuSample(NamedTuple):
    """One reading: wall clock, jiffies busy on the whole machine, jiffies of our own processes."""

    t: float
    busy: int
    own: int


class QuietWait(NamedTuple):
    """The outcome of CpuMonitor.wait_quiet."""

    load: float  # cores other processes used over the last half second
    waited_s: float  # seconds waited beyond that half second


def proc_jiffies(pid: int | str) -> tuple[int, int] | None:
    """(process group, utime+stime in jiffies) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[2]), int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (0 if it is gone)."""
    info = proc_jiffies(pid)
    return 0.0 if info is None else info[1] / HZ


class ServerCpu(NamedTuple):
    """CPU seconds a server's live processes (its process group) have used so far, by kind."""

    api: float  # the API server process(es)
    engine: float  # vLLM's engine core(s) and workers (named VLLM::...): on the CPU build they keep their
    # cores busy while serving (OpenMP threads wait spinning), so their CPU tracks wall time, not work


def group_cpu_seconds(pgid: int) -> ServerCpu:
    """A server's CPU so far: every live process of its process group, split by kind (see ServerCpu)."""
    api = engine = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        info = proc_jiffies(pid)
        if info is None or info[0] != pgid:
            continue
        try:
            vllm_process = Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::")
        except OSError:
            continue
        if vllm_process:
            engine += info[1]
        else:
            api += info[1]
    return ServerCpu(api / HZ, engine / HZ)


def own_cpu_seconds() -> float:
    """CPU time this process (the load generator) has used so far."""
    t = os.times()
    return t.user + t.system


class CpuMonitor:
    """CPU time used by everything except our servers (their process groups, `own_pgids`) and this process."""

    def __init__(self) -> None:
        self.own_pgids: set[int] = set()

    def snapshot(self) -> CpuSample:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
        own = 0
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            info = proc_jiffies(pid)
            if info is not None and (info[0] in self.own_pgids or pid == me):
                own += info[1]
        return CpuSample(time.perf_counter(), busy, own)

    @staticmethod
    def foreign_cores(a: CpuSample, b: CpuSample) -> float:
        """Cores other processes used on average between two samples."""
        elapsed = max(b.t - a.t, 1e-6)
        return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / HZ / elapsed)

    def wait_quiet(self, threshold: float, limit_s: float) -> QuietWait:
        """Sample half a second at a time until other processes use less than `threshold` cores, at most
        `limit_s` seconds."""
        start = time.perf_counter()
        while True:
            a = self.snapshot()
            time.sleep(0.5)
            load = self.foreign_cores(a, self.snapshot())
            waited = time.perf_counter() - start
            if load < threshold or waited >= limit_s:
                return QuietWait(load, max(waited - 0.5, 0.0))
            if waited < 1.0:
                print(f"    other processes use {load:.2f} cores; waiting up to {limit_s:.0f}s", flush=True)
