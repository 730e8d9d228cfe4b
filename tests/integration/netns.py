"""Two "hosts" on one Linux machine, for multi-node tests: two network namespaces joined by a veth pair (their own
addresses, no route anywhere else), and commands run in a host with a private mount namespace whose /tmp and
/dev/shm are fresh tmpfs mounts (no writable filesystem shared between the hosts; each host's /tmp starts as a copy
of a folder the test prepared for it). Read-only shared paths (the venv, the model and SAE assets) stand for the
software installed on each host.

The test process never joins the hosts' network: `Host.session()` gives it a thread pool whose threads entered a
host's network namespace (setns, per thread), so its HTTP calls travel inside the namespaces the test made.

Needs root and `ip netns`; `unavailable()` says why not. Everything is torn down on exit, failures included: the
processes started in a host (by process group, then whatever is left in the namespace), then the namespaces (which
deletes the veth pair). Every wait is bounded by a deadline."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
# A node's mount namespace: fresh tmpfs over /tmp (holding a copy of the node's folder) and /dev/shm, then the
# command. /mnt is the staging point the tmpfs is filled at before it is moved over /tmp. The read-only shared paths
# that lie under /tmp (a checkout or venv there, as on a CI runner) are bound into it read-only at the same path,
# so the move keeps them where they were.
_NODE_SHELL = (
    "set -e; mount --make-rprivate /; mount -t tmpfs -o size=4g,mode=1777 steer-node /mnt; "
    'cp -a "$STEER_NODE_DIR"/. /mnt/; '
    'for keep in $STEER_NODE_KEEP; do case "$keep" in /tmp/*) at="/mnt/${keep#/tmp/}"; mkdir -p "$at"; '
    'mount --bind "$keep" "$at"; mount -o remount,bind,ro "$at";; esac; done; '
    "mount --move /mnt /tmp; "
    "mount -t tmpfs -o size=2g,mode=1777 steer-node-shm /dev/shm; "
    'cd /tmp; unset STEER_NODE_DIR STEER_NODE_KEEP; exec "$@"'
)
# What every host shares read-only (the software installed on each host): this checkout (its venv and assets) and
# the Python it runs on.
SHARED = tuple(
    dict.fromkeys(str(Path(p).resolve()) for p in (Path(__file__).parents[2], sys.prefix, sys.base_prefix))
)


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def unavailable() -> str | None:
    """Why two namespaced hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network and mount namespaces need root (CI runs these tests as root)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"steer-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    return None


@dataclass
class Host:
    """One namespaced host: its network namespace, veth interface and address, and the processes started in it."""

    netns: str
    ifname: str
    addr: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(
        self, cmd: list[str], node_dir: Path, env: dict[str, str], log: IO | None = None
    ) -> subprocess.Popen:
        """`cmd` in this host (its network namespace, a private mount namespace whose /tmp is a copy of
        `node_dir`), in its own process group."""
        env = {**env, "STEER_NODE_DIR": str(node_dir), "STEER_NODE_KEEP": " ".join(SHARED)}
        wrapped = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                   "sh", "-c", _NODE_SHELL, "steer-node", *cmd]  # fmt: skip
        proc = subprocess.Popen(wrapped, env=env, stdout=log, stderr=log, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to every process group started here, SIGKILL after `timeout`; then any process left in the
        network namespace."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.time() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        _kill_namespace_pids(self.netns)

    @contextmanager
    def session(self, threads: int = 8) -> Iterator[ThreadPoolExecutor]:
        """A thread pool whose threads live in this host's network namespace (sockets they open connect inside
        it): `pool.submit(requests.get, f"http://{host.addr}:PORT/health")`."""
        with ThreadPoolExecutor(max_workers=threads, initializer=enter_netns, initargs=(self.netns,)) as pool:
            yield pool


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_namespace_pids(netns: str) -> None:
    deadline = time.time() + 20
    while time.time() < deadline:
        listed = _run("ip", "netns", "pids", netns)
        pids = [int(p) for p in listed.stdout.split()] if listed.returncode == 0 else []
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@contextmanager
def two_hosts(subnet: str = "10.77.0", prefix: str = "steer") -> Iterator[tuple[Host, Host]]:
    """Hosts `subnet`.1 and `subnet`.2 (/24) on a veth pair, each in its own network namespace with `lo` up;
    both namespaces (and so the pair) deleted on exit, after the processes started in them."""
    tag = uuid.uuid4().hex[:6]
    hosts = [Host(f"{prefix}-{tag}-n{i}", f"st{tag}n{i}", f"{subnet}.{i + 1}") for i in range(2)]
    made: list[Host] = []
    lock = threading.Lock()
    try:
        for host in hosts:
            _checked("ip", "netns", "add", host.netns)
            with lock:
                made.append(host)
        _checked("ip", "link", "add", hosts[0].ifname, "netns", hosts[0].netns,
                 "type", "veth", "peer", "name", hosts[1].ifname, "netns", hosts[1].netns)  # fmt: skip
        for host in hosts:
            ns = ("ip", "-n", host.netns)
            _checked(*ns, "link", "set", "lo", "up")
            _checked(*ns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _checked(*ns, "link", "set", host.ifname, "up")
        if shutil.which("ping"):
            ping = _run("ip", "netns", "exec", hosts[0].netns, "ping", "-c", "1", "-W", "5", hosts[1].addr)
            if ping.returncode != 0:
                raise RuntimeError(f"the two hosts cannot reach each other: {ping.stdout}{ping.stderr}")
        yield hosts[0], hosts[1]
    finally:
        for host in made:
            host.stop()
        for host in made:
            _run("ip", "netns", "del", host.netns)


def _checked(*cmd: str) -> None:
    done = _run(*cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
