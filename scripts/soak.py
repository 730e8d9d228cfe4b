"""Soak a running steer-serve server with mixed traffic, including clients that disconnect mid-stream.

    python scripts/soak.py --base http://127.0.0.1:8000 --server-pid PID [--duration 300] [--api-key KEY]
        [--concurrency 4] [--json OUT]

Traffic (loopback only, bounded by --duration): plain, steered, inspected and monitored completions and
chats, streaming and not, a third of the streams dropped by the client after a few chunks. Every 10 s it
prints progress. At the end it waits for the server to drain, then reports (and with --check, asserts):
running requests back to 0, resident memory of the API server and of each engine/worker process at the end
vs after warm-up, files left in the run dir, and any 5xx answer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

STEER_ADD = {"features": [{"sae": "demo", "index": 123, "op": "add", "value": 0.8, "normalize": True}]}
STEER_CLAMP = {
    "features": [{"sae": "demo", "index": 7, "op": "clamp", "value": 40.0, "positions": "generation"}]
}
INSPECT = {"inspect": {"top_k": 3}}


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident bytes of the server and each of its descendants, by 'name:pid'."""
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[f"{p.name()}:{p.pid}"] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def running_requests(session: requests.Session, base: str) -> float:
    text = session.get(f"{base}/metrics", timeout=30).text
    values = [float(m) for m in re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, re.M)]
    return sum(values)


def open_mailboxes(session: requests.Session, base: str) -> float:
    """Observed requests whose mailbox is still open in the API processes (0 once every response ended)."""
    text = session.get(f"{base}/metrics", timeout=30).text
    return sum(
        float(m) for m in re.findall(r"^steer_observation_open_requests(?:\{[^}]*\})? (\S+)$", text, re.M)
    )


class Traffic:
    def __init__(self, base: str, headers: dict, seed: int):
        self.base, self.headers = base, headers
        self.rng = random.Random(seed)
        self.counts: dict[str, int] = {}
        self.server_errors: list[str] = []
        self.lock = threading.Lock()

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def one(self, session: requests.Session) -> None:
        rng = self.rng
        steering = rng.choice([None, STEER_ADD, STEER_CLAMP, INSPECT, {**STEER_ADD, **INSPECT}])
        chat = rng.random() < 0.5
        stream = rng.random() < 0.6
        drop = stream and rng.random() < 0.5
        body = {"model": "demo", "max_tokens": rng.choice([4, 16, 48]), "temperature": 0.7, "stream": stream}
        if chat:
            body["messages"] = [
                {"role": "user", "content": rng.choice(["Tell me a story.", "What is rain?"])}
            ]
        else:
            body["prompt"] = rng.choice(["Once upon a time", "The bridge", "def sort(xs):"])
        if steering is not None:
            body["steering"] = steering
        path = "/v1/chat/completions" if chat else "/v1/completions"
        r = session.post(self.base + path, json=body, headers=self.headers, stream=stream, timeout=300)
        if r.status_code >= 500:
            with self.lock:
                self.server_errors.append(f"{r.status_code} {path}: {r.text[:200]}")
        if stream:
            for i, _ in enumerate(r.iter_lines()):
                if drop and i >= rng.randint(1, 4):
                    break
            r.close()
        self.count(("dropped" if drop else "stream") if stream else "full")

    def worker(self, deadline: float) -> None:
        session = requests.Session()
        while time.time() < deadline:
            try:
                self.one(session)
            except requests.RequestException as err:
                with self.lock:
                    self.server_errors.append(f"connection: {err}")
                session = requests.Session()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--api-key")
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true", help="exit 1 when a figure is off")
    ap.add_argument("--max-rss-growth", type=float, default=0.15, help="allowed relative RSS growth")
    args = ap.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    traffic = Traffic(args.base, headers, seed=0)
    started = time.time()
    deadline = started + args.warmup + args.duration
    threads = [
        threading.Thread(target=traffic.worker, args=(deadline,), daemon=True)
        for _ in range(args.concurrency)
    ]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    rss_start = rss_by_process(args.server_pid)
    while any(t.is_alive() for t in threads):
        time.sleep(min(10.0, max(1.0, deadline - time.time())))
        print(
            f"[soak] {time.time() - started:5.0f}s {traffic.counts} 5xx={len(traffic.server_errors)}",
            flush=True,
        )
        if time.time() > deadline + 300:
            break
    session = requests.Session()
    session.headers.update(headers)
    drain_deadline = time.time() + 120
    running = running_requests(session, args.base)
    while running > 0 and time.time() < drain_deadline:
        time.sleep(1)
        running = running_requests(session, args.base)
    left = open_mailboxes(session, args.base)
    for _ in range(30):
        if not left:
            break
        time.sleep(1)
        left = open_mailboxes(session, args.base)
    rss_end = rss_by_process(args.server_pid)
    growth = {
        name: (rss_end[name] - rss_start[name]) / rss_start[name] for name in rss_start if name in rss_end
    }
    report = {
        "seconds": round(time.time() - started, 1),
        "requests": traffic.counts,
        "server_errors": traffic.server_errors[:20],
        "running_after_drain": running,
        "rss_start_mib": {k: round(v / 2**20, 1) for k, v in rss_start.items()},
        "rss_end_mib": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
        "rss_growth": {k: round(v, 4) for k, v in growth.items()},
        "open_mailboxes_left": left,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = (
        not traffic.server_errors
        and running == 0
        and not left
        and all(g <= args.max_rss_growth for g in growth.values())
    )
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
