#!/usr/bin/env python
"""Cost per observed token of the observation transport (steer_plugin.monitor.transport and inbox), without vLLM.

    python benchmarks/observe_transport_bench.py                       # 20000 tokens, abstract IPC
    python benchmarks/observe_transport_bench.py --host 127.0.0.1      # TCP, as across hosts

What a worker and the API process do per observed token, timed separately (one process plays both: each side's
cost is the time on its own thread; the crossing itself runs on ZeroMQ's I/O threads):
  - send: the TP-rank-0 worker packs the step's SAE reads (top-K 5, two traced features, as arrays after the
          encode) into one block per API process and flushes them as one message (engine/blocks.py token_blocks,
          Outbox.post_block, flush: msgpack, HMAC, one non-blocking send), `--batch` requests per decode step;
  - take: the API process takes what is new for each request before it streams that token (Inbox.take: drain the
          socket, check each message's MAC, cut its block into each owner's TokenRecords).
Prompt observation (`inspect.prompt`) sends a whole prompt's records in one message: `--prompt` tokens, timed as
one send and one take. Prints µs per token next to the file channel it replaced
(benchmarks/results/observe-file-channel-cpu.json, measured on the same machine) and writes OUT.json with `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import numpy as np

from steer_plugin import signing
from steer_plugin.engine.blocks import token_blocks
from steer_plugin.engine.observe import ObservedRows
from steer_plugin.monitor.inbox import Inbox
from steer_plugin.monitor.transport import Outbox
from steer_plugin.request.records import encode_step
from steer_plugin.request.wire import Addressee

FILE_CHANNEL = Path(__file__).parent / "results" / "observe-file-channel-cpu.json"


TOP_K = 5
WATCH = ((5, 1.0), (77, 0.0))  # two traced features (their thresholds)


def step_reads(positions: list[int]) -> list[np.ndarray]:
    """What an SAE encode gives for these rows (top-K values and indices, L0, error, the traced features)."""
    n, rows = len(positions), np.arange(len(positions))[:, None]
    values = (10.0 / (np.arange(TOP_K) + 1) + (rows % 7) * 0.0123).astype(np.float32)
    indices = (1000 + 37 * np.arange(TOP_K) + rows % 11).astype(np.int64)
    watched = np.tile(np.array([[1.2345, 0.0]], np.float32), (n, 1))
    return [values, indices, np.zeros(n, np.int64), np.full(n, np.nan, np.float32), watched]


def group(to: Addressee, rows: list[int], positions: list[int]) -> ObservedRows:
    return ObservedRows(to, "demo", TOP_K, rows, positions, 12, WATCH)


def arrived(inbox: Inbox, count: int) -> None:
    """Wait (untimed) until `count` messages are queued at the inbox's socket or routed."""
    deadline = time.monotonic() + 30
    while sum(map(len, inbox.boxes.values())) < count and time.monotonic() < deadline:
        inbox.wait(0.001)


def decode_steps(inbox: Inbox, outbox: Outbox, tokens: int, batch: int) -> dict:
    to = [Addressee(inbox.address, uuid.uuid4().hex) for _ in range(batch)]
    for a in to:
        inbox.open(a.cid)
    steps = tokens // batch
    column = {index: c for c, (index, _) in enumerate(WATCH)}
    send = take = 0.0
    for step in range(steps):
        groups = [group(a, [j], [12 + step]) for j, a in enumerate(to)]  # (planned before the forward)
        read = step_reads([12 + step] * batch)  # (the encode's output)
        started = time.perf_counter()
        for address, block in token_blocks("demo", groups, read, column, {}, 1):  # Observer.collect
            outbox.post_block(address, block)
        assert outbox.flush() == 1  # Steerer.after_forward: one message per API process
        send += time.perf_counter() - started
        arrived(inbox, batch)
        started = time.perf_counter()
        for a in to:  # the API process: one take per streamed token of each request
            got = inbox.take(a.cid)
            assert len(got) == 1 and got[0].pos == 12 + step
        take += time.perf_counter() - started
    for a in to:
        inbox.close(a.cid)
    n = steps * batch
    return {"tokens": n, "send_us": 1e6 * send / n, "take_us": 1e6 * take / n}


def prompt_once(inbox: Inbox, outbox: Outbox, prompt: int, repeats: int) -> dict:
    column = {index: c for c, (index, _) in enumerate(WATCH)}
    send = take = 0.0
    for _ in range(repeats):
        a = Addressee(inbox.address, uuid.uuid4().hex)
        inbox.open(a.cid)
        groups = [group(a, list(range(prompt)), list(range(prompt)))]
        read = step_reads(list(range(prompt)))
        started = time.perf_counter()
        for address, block in token_blocks("demo", groups, read, column, {}, 1):
            outbox.post_block(address, block)
        assert outbox.flush() == 1
        send += time.perf_counter() - started
        arrived(inbox, 1)
        started = time.perf_counter()
        assert len(inbox.take(a.cid)) == prompt
        take += time.perf_counter() - started
        inbox.close(a.cid)
    n = prompt * repeats
    return {"tokens": n, "send_us": 1e6 * send / n, "take_us": 1e6 * take / n}


def message_bytes(batch: int) -> int:
    """The bytes of one decode step's message body for `batch` requests."""
    to = [Addressee("ipc://@x", uuid.uuid4().hex) for _ in range(batch)]
    groups = [group(a, [j], [100]) for j, a in enumerate(to)]
    column = {index: c for c, (index, _) in enumerate(WATCH)}
    blocks = [b for _, b in token_blocks("demo", groups, step_reads([100] * batch), column, {}, 1)]
    return len(encode_step({}, blocks))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=8, help="observed requests per decode step")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens observed in one message")
    parser.add_argument("--host", default=None, help="bind TCP on this address (default: abstract IPC)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    key = signing.wire_key()
    inbox, outbox = Inbox(key, args.host), Outbox(key)
    result = {
        "address": inbox.address.split("@")[0] + ("@..." if "@" in inbox.address else ""),
        "message_bytes_per_token": message_bytes(args.batch) / args.batch,
        "decode": decode_steps(inbox, outbox, args.tokens, args.batch),
        "prompt": prompt_once(inbox, outbox, args.prompt, max(1, args.tokens // args.prompt)),
        "batch": args.batch,
    }
    outbox.close()
    inbox.close_socket()
    before = json.loads(FILE_CHANNEL.read_text()) if FILE_CHANNEL.exists() else None
    for kind in ("decode", "prompt"):
        r = result[kind]
        line = (
            f"{kind:7s} {r['tokens']:6d} tokens: send {r['send_us']:6.2f} µs/token (worker), "
            f"take {r['take_us']:6.2f} µs/token (API process)"
        )
        if before is not None:
            b = before[kind]
            line += f"; file channel: write {b['write_us']:6.2f}, read {b['read_us']:6.2f}"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
