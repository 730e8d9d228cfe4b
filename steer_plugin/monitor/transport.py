"""Observation transport: a step's observation results (request/records.py) go from the worker that owns the
layer to the API process that owns the request, as ZeroMQ messages (pyzmq, which vLLM uses between its own processes).

The API process's side is monitor/inbox.py: one PULL socket per API process, whose address travels in every
observed request's signed plan (ObservePlan.reply_to): IPC on one host, TCP across hosts. This module is the
worker's side and the framing both share. A worker's `Outbox` sends one message per API process and step, two
frames: the records of each of its requests by cid and the step's blocks (one per layer's probes and per SAE
read, for all of its requests), in msgpack (request/records.py: `encode_step`), and a MAC
(16 bytes), an HMAC of the first frame under the server's wire key (steer_plugin/signing.py). A step never blocks on it: each peer's queue is bounded (SEND_HWM messages) and a
message that does not fit is dropped and counted (WorkerStats.observation_dropped); the API process reports the
tokens whose records never came as missing (null), never as wrong ones.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import zmq

from steer_plugin import signing
from steer_plugin.request.records import Block, WireRecord, encode_step
from steer_plugin.request.wire import Addressee

HOST_ENV = "STEER_PLUGIN_OBSERVE_HOST"  # bind TCP on this address (reachable from every node) instead of IPC
SEND_HWM = 1024  # messages queued per peer in a worker before new ones are dropped
MAX_PEERS = 64  # API-process addresses a worker keeps a socket to (least recently used closed first)
MAC_BYTES = 16
CID_BYTES = 16
T = TypeVar("T")


def mac(key: bytes, body: bytes) -> bytes:
    """A message's authentication code: HMAC-SHA256 of its body under the wire key, truncated."""
    return hmac.digest(key, body, "sha256")[:MAC_BYTES]


class PerProcess(Generic[T]):
    """One object per process, made on first use: a forked child makes its own (ZeroMQ contexts and sockets do
    not survive fork)."""

    def __init__(self, make: Callable[[], T]):
        self.make = make
        self.value: T | None = None
        self.pid = 0
        self.lock = threading.Lock()

    def get(self) -> T:
        with self.lock:
            if self.value is None or self.pid != os.getpid():
                self.value, self.pid = self.make(), os.getpid()
            return self.value

    def made(self) -> T | None:
        """This process's object if it was made, without making it."""
        return self.value if self.pid == os.getpid() else None


_CONTEXT = PerProcess(lambda: zmq.Context(io_threads=1))


def context() -> zmq.Context:
    """This process's ZeroMQ context."""
    return _CONTEXT.get()


class Outbox:
    """Worker side: a step's records are posted per request, then flushed as one message per API process (one
    PUSH socket per address); `flush` never blocks a step."""

    def __init__(self, key: bytes):
        self.key = key
        self.sockets: OrderedDict[str, zmq.Socket] = OrderedDict()
        self.pending: dict[str, dict[str, list[WireRecord]]] = {}  # this step's: address -> cid -> records
        self.blocks: dict[str, list[Block]] = {}  # this step's blocks by address
        self.dropped = 0  # records whose message could not be queued

    def _socket(self, address: str) -> zmq.Socket:
        sock = self.sockets.get(address)
        if sock is not None:
            self.sockets.move_to_end(address)
            return sock
        sock = context().socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.LINGER, 0)  # a closed socket drops what it still holds
        sock.setsockopt(zmq.IPV6, 1)  # an inbox may be on an IPv6 address (IPv4 ones still work)
        sock.connect(address)  # asynchronous: messages queue (bounded) until the connection is up
        self.sockets[address] = sock
        if len(self.sockets) > MAX_PEERS:
            _, oldest = self.sockets.popitem(last=False)
            oldest.close(0)
        return sock

    def post(self, to: Addressee, records: list[WireRecord]) -> None:
        """Add `records` of request `to` to this step's messages (an empty address: nowhere)."""
        if to.address and records:
            self.pending.setdefault(to.address, {}).setdefault(to.cid, []).extend(records)

    def post_block(self, address: str, block: Block) -> None:
        """Add a block for the API process at `address` to this step's message (empty address: nowhere)."""
        if address and block.cids:
            self.blocks.setdefault(address, []).append(block)

    def flush(self) -> int:
        """Queue this step's messages, one per API process: two frames, the step's records of each of its
        requests and its blocks (records.encode_step), and their MAC. Returns how many could be queued; a
        message that cannot (its peer's queue is full: a slow or gone API process) is dropped and its records
        counted (a block: the records it stands for)."""
        pending, blocks = self.pending, self.blocks
        self.pending, self.blocks = {}, {}
        queued = 0
        for address in pending.keys() | blocks.keys():
            by_cid, its_blocks = pending.get(address, {}), blocks.get(address, [])
            body = encode_step({bytes.fromhex(cid): records for cid, records in by_cid.items()}, its_blocks)
            try:
                self._socket(address).send_multipart([body, mac(self.key, body)], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.dropped += sum(map(len, by_cid.values())) + sum(b.size() for b in its_blocks)
                continue
            queued += 1
        return queued

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()


_OUTBOX = PerProcess(lambda: Outbox(signing.wire_key()))


def outbox() -> Outbox:
    """This worker's outbox (made on first use, in the worker process)."""
    return _OUTBOX.get()


def dropped() -> int:
    """Records this worker could not queue (for /metrics: WorkerStats.observation_dropped)."""
    made = _OUTBOX.made()
    return 0 if made is None else made.dropped


def post(to: Addressee, records: list[WireRecord]) -> None:
    """Worker: add a step's records for one request to the step's messages (sent by `flush`)."""
    outbox().post(to, records)


def post_all(records: dict[Addressee, list[WireRecord]]) -> None:
    """Worker: `post` for each request of a step at once (the outbox looked up once, not per request)."""
    box = outbox()
    for to, lines in records.items():
        box.post(to, lines)


def post_block(address: str, block: Block) -> None:
    """Worker: add a block (a layer's probe scores or an SAE's reads of a step) for one API process to the step's
    messages (sent by `flush`)."""
    outbox().post_block(address, block)


def flush() -> int:
    """Worker: send the step's messages (Outbox.flush); after the step's reads, once."""
    made = _OUTBOX.made()  # (none made: nothing was posted in this process)
    return 0 if made is None else made.flush()
