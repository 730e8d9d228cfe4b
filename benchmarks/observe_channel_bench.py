#!/usr/bin/env python
"""Cost per observed token of the observation transport (steer_plugin.monitor.channel), without vLLM.

    python benchmarks/observe_channel_bench.py                    # 20000 tokens, run dir under $TMPDIR
    python benchmarks/observe_channel_bench.py --dir /mnt/shared  # the run dir on another filesystem (NFS...)

What a worker and the API process do per observed token, timed separately:
  - write: the TP-rank-0 worker appends the step's `TokenRecord`s (channel.append: open, one write, close), here one
           record per request per decode step (top-K 5, two traced features), `--batch` requests per step;
  - read:  the API process reads what is new for one request before it streams that token
           (ChannelReader.read_new: open, seek, read, parse each line into a TokenRecord).
Prompt observation (`inspect.prompt`) writes a whole prompt's records in one append: `--prompt` tokens, timed
as one write and one read. Prints µs per token and writes OUT.json when `--out` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid

from steer_plugin.monitor import channel
from steer_plugin.request.records import TokenRecord


def record(pos: int) -> TokenRecord:
    top = tuple((1000 + 37 * k + pos % 11, round(10.0 / (k + 1) + pos % 7 * 0.0123, 4)) for k in range(5))
    return TokenRecord(pos, 12, "demo", top, watch=((5, 1.2345), (77, 0.0)))


def decode_steps(tokens: int, batch: int) -> dict:
    cids = [uuid.uuid4().hex for _ in range(batch)]
    for cid in cids:
        channel.create(cid)
    readers = [channel.ChannelReader(cid) for cid in cids]
    steps = tokens // batch
    write = read = 0.0
    for step in range(steps):
        started = time.perf_counter()
        for cid in cids:  # Observer.collect: one append per request of the step
            channel.append(cid, [record(12 + step)])
        write += time.perf_counter() - started
        started = time.perf_counter()
        for reader in readers:  # the API process: one read per streamed token of each request
            got = reader.read_new()
            assert len(got) == 1 and got[0].pos == 12 + step
        read += time.perf_counter() - started
    for reader in readers:
        reader.remove()
    n = steps * batch
    return {"tokens": n, "write_us": 1e6 * write / n, "read_us": 1e6 * read / n}


def prompt_once(prompt: int, repeats: int) -> dict:
    write = read = 0.0
    for _ in range(repeats):
        cid = uuid.uuid4().hex
        channel.create(cid)
        reader = channel.ChannelReader(cid)
        started = time.perf_counter()
        channel.append(cid, [record(p) for p in range(prompt)])
        write += time.perf_counter() - started
        started = time.perf_counter()
        assert len(reader.read_new()) == prompt
        read += time.perf_counter() - started
        reader.remove()
    n = prompt * repeats
    return {"tokens": n, "write_us": 1e6 * write / n, "read_us": 1e6 * read / n}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=8, help="observed requests per decode step")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens observed in one append")
    parser.add_argument("--dir", default=None, help="run dir parent (default: $TMPDIR)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ[channel.RUN_DIR_ENV] = tempfile.mkdtemp(prefix="steer-channel-bench-", dir=args.dir)
    line = len(json.dumps(record(100).to_json(), separators=(",", ":"))) + 1
    result = {
        "run_dir": os.environ[channel.RUN_DIR_ENV],
        "record_bytes": line,
        "decode": decode_steps(args.tokens, args.batch),
        "prompt": prompt_once(args.prompt, max(1, args.tokens // args.prompt)),
        "batch": args.batch,
    }
    os.rmdir(os.environ[channel.RUN_DIR_ENV])
    for kind in ("decode", "prompt"):
        r = result[kind]
        print(
            f"{kind:7s} {r['tokens']:6d} tokens: write {r['write_us']:7.2f} µs/token (worker), "
            f"read {r['read_us']:7.2f} µs/token (API process); {line} bytes/record"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
