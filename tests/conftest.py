"""Fixtures shared by the unit tests."""

from __future__ import annotations

import time

import pytest

from steer_plugin import signing
from steer_plugin.monitor import transport
from steer_plugin.monitor.inbox import Inbox
from steer_plugin.request.records import Record, TokenRecord
from steer_plugin.request.wire import Addressee, ObservePlan

_END = TokenRecord(-1, 0, "\x00end", ())  # marks "everything sent before this" in a mailbox


class Mailroom:
    """A real observation inbox (monitor/inbox.py) that the worker code under test sends its records to
    through the real outbox (monitor/transport.py)."""

    def __init__(self):
        self.inbox = Inbox(signing.wire_key())

    def to(self, cid: str) -> Addressee:
        """The request `cid`'s address here (its mailbox opened)."""
        self.inbox.open(cid)
        return Addressee(self.inbox.address, cid)

    def plan(self, cid: str, *args, **kwargs) -> ObservePlan:
        """An observation whose records come here (its mailbox opened)."""
        return ObservePlan(cid, *args, reply_to=self.to(cid).address, **kwargs)

    def read(self, cid: str, timeout_s: float = 30.0) -> list[Record]:
        """Every record sent to `cid` so far, in order: a marker goes after them through the same outbox socket
        (ZeroMQ keeps one socket's messages in order), so no waiting on a guess."""
        transport.flush()  # whatever the code under test posted and did not flush, then the marker after it
        transport.post(Addressee(self.inbox.address, cid), [_END])
        transport.flush()
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for r in self.inbox.take(cid):
                if r == _END:
                    return out
                out.append(r)
            self.inbox.wait(0.01)
        raise AssertionError(f"the marker sent to {cid} never arrived")

    def close(self) -> None:
        self.inbox.close_socket()


@pytest.fixture
def mailroom():
    room = Mailroom()
    yield room
    room.close()
