"""sched_probe's per-thread counters: read from /proc for this process tree, differences per thread."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[2] / "benchmarks" / "sched_probe.py"


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(PROBE.parent))  # it imports its siblings (harness, serve_cases) as a script would
    spec = importlib.util.spec_from_file_location("sched_probe_under_test", PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


class _Busy(threading.Thread):
    """Spins for `seconds` of its own CPU time, then stays alive (blocked) until released."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.tid = seconds, 0
        self.done, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:  # CPU time, so a loaded machine only makes it take longer
            pass
        self.done.set()
        self.release.wait()


def _blocked(tid: int) -> None:
    """Wait (bounded) until thread `tid` sleeps."""
    stat = f"/proc/self/task/{tid}/stat"
    for _ in range(1000):
        if open(stat).read().rsplit(")", 1)[1].split()[0] == "S":
            return
        time.sleep(0.001)


def test_a_busy_thread_shows_its_cpu_time_and_an_idle_one_is_left_out(probe):
    idle, busy = _Busy(0.0), _Busy(0.3)
    idle.start()
    idle.done.wait()
    _blocked(idle.tid)  # (done is set just before it blocks: a snapshot in between would see it run)
    try:
        before = probe.snapshot()
        busy.start()
        busy.done.wait()
        after = probe.snapshot()
    finally:
        idle.release.set()
        busy.release.set()
        idle.join()
        busy.join()
    pid = os.getpid()
    assert before[(pid, pid)].role == "client" and after[(pid, pid)].run_s >= before[(pid, pid)].run_s
    threads = probe.delta(before, after)
    # the busy thread started after `before`: its whole CPU time counts, and it spun for 0.3 s of it
    mine = [t for t in threads if t.comm.endswith(f"[{busy.tid}]")]
    assert len(mine) == 1 and 0.29 <= mine[0].run_s < 5, threads
    assert not [t for t in threads if t.comm.endswith(f"[{idle.tid}]")]  # blocked the whole time


def test_child_processes_are_in_the_tree(probe):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in probe._tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in probe._tree(os.getpid())
        assert any(pid == child.pid for pid, _ in probe.snapshot())
    finally:
        child.kill()
        child.wait()
