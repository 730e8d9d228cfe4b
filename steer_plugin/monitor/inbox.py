"""The API process's side of the observation transport (monitor/transport.py): one PULL socket, the `Inbox`,
that every worker sends this process's records to, and the open requests' pending messages.

Bound when each API process starts: an abstract-namespace IPC address by default (one host, nothing on disk),
TCP on STEER_PLUGIN_OBSERVE_HOST where workers run on other hosts. A message is accepted only when its MAC
verifies with the server's wire key, and each part of it only for a request this process has open; everything
else is dropped and counted by reason (steer_observation_dropped_total), so a restarted process, a stray sender or
a late step never adds records to a response. Nothing is left behind: a mailbox is closed when its response
ends, however it ends (steer_observation_open_requests counts the open ones).
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from collections import OrderedDict

import msgspec
import zmq

from steer_plugin import metrics, signing
from steer_plugin.monitor import transport
from steer_plugin.request.records import Record, decode_block, decode_records, split_step

HOST_ENV = transport.HOST_ENV
RECV_HWM = 16384  # messages queued in the API process before the senders' queues fill
# One worker's step for this process: a fit's residual rows are the largest (a text's tokens x d_model float32).
MAX_MESSAGE_BYTES = 256 << 20
MAX_PENDING = 1 << 16  # step messages one request's mailbox holds before new ones are dropped
RECENT = 4096  # closed requests remembered, so late records count as "late", not "unowned"
# (plain ints, and `Socket.get`, not `getsockopt`: converting to the enums costs more than the flag read itself,
# once per streamed token)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Inbox:
    """API side: the PULL socket every worker sends this process's records to, and the open requests' pending
    messages. Drained by whoever reads (`take`), on the thread that serves the responses: no thread of its own."""

    def __init__(self, key: bytes, host: str | None = None):
        self.key = key
        self.lock = threading.Lock()
        self.socket = transport.context().socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, RECV_HWM)
        self.socket.setsockopt(
            zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES
        )  # a bigger one closes its sender's connection
        self.socket.setsockopt(zmq.LINGER, 0)
        if host:
            bracketed = host
            if ":" in host:  # IPv6
                self.socket.setsockopt(zmq.IPV6, 1)
                bracketed = "[" + host.strip("[]") + "]"
            try:
                self.socket.bind(f"tcp://{bracketed}:*")
            except zmq.ZMQError as err:
                self.socket.close(0)
                raise RuntimeError(
                    f"steer_plugin: cannot bind the observation inbox on {HOST_ENV}={host!r} (an address of this "
                    f"host that every node reaches): {err}"
                ) from None
        else:
            self.socket.bind(f"ipc://@steer-observe-{secrets.token_hex(12)}")  # abstract: nothing on disk
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Open requests by cid: what arrived and was not taken yet, one entry per step message: its records still
        # encoded, and those read out of the message's blocks when it was routed.
        self.boxes: dict[str, list[list[msgspec.Raw | list[Record]]]] = {}
        self.recent: OrderedDict[str, None] = OrderedDict()  # closed cids (bounded)

    def open(self, cid: str) -> None:
        """Start accepting records for request `cid` (before it reaches the engine)."""
        with self.lock:
            if cid not in self.boxes:
                self.boxes[cid] = []
                metrics.OBSERVATION_OPEN.inc()

    def take(self, cid: str) -> list[Record]:
        """Every record that has arrived for request `cid` since the last call (drains the socket first)."""
        self.drain()
        with self.lock:
            box = self.boxes.get(cid)
            if box is None:
                return []
            payloads = box[:]
            box.clear()
        out: list[Record] = []
        for message in payloads:
            for payload in message:
                if isinstance(payload, list):
                    out.extend(payload)
                    continue
                try:
                    out.extend(decode_records(payload))
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    _drop("malformed")
        return out

    def close(self, cid: str) -> None:
        """Stop accepting records for request `cid`; what is still pending is dropped."""
        with self.lock:
            if self.boxes.pop(cid, None) is not None:
                metrics.OBSERVATION_OPEN.dec()
                self.recent[cid] = None
                while len(self.recent) > RECENT:
                    self.recent.popitem(last=False)

    def drain(self) -> None:
        """Route every message that has arrived to its mailbox (or drop it, counted), without blocking."""
        with self.lock:
            # (EVENTS is a flag read, no system call: most calls find nothing new, another response's read took it)
            while self.socket.get(_EVENTS) & _POLLIN:
                try:
                    frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    return
                self._route(frames)

    def wait(self, timeout_s: float) -> None:
        """Block up to `timeout_s` for more messages (for any request), then route them."""
        if self.socket.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            self.drain()

    def _route(self, frames: list[bytes]) -> None:
        """One worker's message of a step: [records by cid and blocks, MAC]."""
        if len(frames) != 2 or len(frames[1]) != transport.MAC_BYTES:
            return _drop("malformed")
        body, code = frames
        if not hmac.compare_digest(code, transport.mac(self.key, body)):
            return _drop("unauthenticated")
        try:
            parts, blocks = split_step(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _drop("malformed")
        by_cid: dict[bytes, list[msgspec.Raw | list[Record]]] = {}  # this message's part for each request
        for cid, payload in parts:
            by_cid.setdefault(cid, []).append(payload)
        for kind, block in blocks:
            try:
                by_request = decode_block(kind, block)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                _drop("malformed")
                continue
            for cid, records in by_request:  # each request's rows only to its own mailbox
                by_cid.setdefault(cid, []).append(records)
        for cid, message in by_cid.items():
            name = cid.hex()
            box = self.boxes.get(name) if len(cid) == transport.CID_BYTES else None
            if box is None:
                _drop("late" if name in self.recent else "unowned")
            elif len(box) >= MAX_PENDING:
                _drop("overflow")
            else:
                box.append(message)

    def close_socket(self) -> None:
        self.socket.close(0)


def _drop(reason: str) -> None:
    metrics.OBSERVATION_DROPPED.labels(reason=reason).inc()


_INBOX = transport.PerProcess(lambda: Inbox(signing.wire_key(), os.environ.get(HOST_ENV) or None))


def inbox() -> Inbox:
    """This API process's inbox, bound on first use (the middleware's start; each API process has its own)."""
    return _INBOX.get()
