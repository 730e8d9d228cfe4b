"""The observation transport over real ZeroMQ sockets: the worker's Outbox (monitor/transport.py) to an API
process's Inbox (monitor/inbox.py). What it accepts, what it drops (and counts), and that a step never blocks."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest
import zmq
from prometheus_client import REGISTRY

from steer_plugin import signing
from steer_plugin.monitor import inbox as inbox_module
from steer_plugin.monitor import transport
from steer_plugin.monitor.inbox import Inbox
from steer_plugin.request.records import ProbeBlock, ProbeRecord, TokenBlock, TokenRecord, encode_step
from steer_plugin.request.wire import Addressee

CID, OTHER = "a" * 32, "b" * 32
RECORD = TokenRecord(4, 3, "s", ((1, 2.0),))


def send(to: Addressee, records: list) -> bool:
    """One step of one request through this process's outbox: True when its message was queued."""
    transport.post(to, records)
    return transport.flush() == 1


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("steer_observation_dropped_total", {"reason": reason}) or 0.0


def arrived(inbox: Inbox, cid: str, count: int, timeout_s: float = 30.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        out += inbox.take(cid)
        inbox.wait(0.01)
    return out


def settled(inbox: Inbox, mailroom_cid: str) -> None:
    """Everything sent before now through this process's outbox has been routed (a marker to an open
    mailbox goes after it on the same socket)."""
    inbox.open(mailroom_cid)
    send(Addressee(inbox.address, mailroom_cid), [RECORD])
    assert arrived(inbox, mailroom_cid, 1) == [RECORD]


@pytest.fixture
def inbox():
    box = Inbox(signing.wire_key())
    yield box
    box.close_socket()


def test_records_reach_the_request_they_name_in_order(inbox):
    assert inbox.address.startswith("ipc://@")  # abstract namespace: nothing on disk
    inbox.open(CID)
    inbox.open(OTHER)
    steps = [[TokenRecord(p, 3, "s", ((p, float(p)),))] for p in range(5)]
    for records in steps:
        assert send(Addressee(inbox.address, CID), records)
    assert send(Addressee(inbox.address, OTHER), [RECORD])
    assert arrived(inbox, CID, 5) == [r for step in steps for r in step]
    assert arrived(inbox, OTHER, 1) == [RECORD]


@pytest.mark.parametrize(("host", "bound"), [("127.0.0.1", "tcp://127.0.0.1:"), ("::1", "tcp://[::1]:")])
def test_tcp_when_a_host_is_given(host, bound):
    try:
        box = Inbox(signing.wire_key(), host=host)
    except RuntimeError as err:
        if host == "::1":
            pytest.skip(f"no IPv6 loopback here: {err}")
        raise
    try:
        assert box.address.startswith(bound)
        box.open(CID)
        assert send(Addressee(box.address, CID), [RECORD])
        assert arrived(box, CID, 1) == [RECORD]
    finally:
        box.close_socket()


def test_an_address_this_host_does_not_have_is_refused_naming_the_variable():
    with pytest.raises(RuntimeError, match="STEER_PLUGIN_OBSERVE_HOST='203.0.113.7'"):
        Inbox(signing.wire_key(), host="203.0.113.7")  # TEST-NET-3: never an address of this host


def test_a_message_under_another_key_is_dropped_and_counted(inbox):
    inbox.open(CID)
    before = dropped("unauthenticated")
    forger = transport.Outbox(b"not the server's key")
    try:
        forger.post(Addressee(inbox.address, CID), [RECORD])
        assert forger.flush() == 1
        deadline = time.monotonic() + 30
        while dropped("unauthenticated") == before and time.monotonic() < deadline:
            inbox.wait(0.01)
            inbox.drain()
    finally:
        forger.close()
    assert dropped("unauthenticated") == before + 1
    assert inbox.take(CID) == []


def test_records_for_requests_not_open_here_are_dropped_by_reason(inbox):
    unowned, late = dropped("unowned"), dropped("late")
    inbox.open(CID)
    inbox.close(CID)  # finished: what comes now is late
    send(Addressee(inbox.address, CID), [RECORD])
    send(Addressee(inbox.address, OTHER), [RECORD])  # never opened here (another API process's)
    settled(inbox, "c" * 32)
    assert (dropped("late"), dropped("unowned")) == (late + 1, unowned + 1)
    assert CID not in inbox.boxes and OTHER not in inbox.boxes  # nothing kept for them


def test_malformed_frames_and_payloads_are_dropped(inbox):
    inbox.open(CID)
    before = dropped("malformed")
    raw = transport.context().socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(inbox.address)
    key = signing.wire_key()
    cid = bytes.fromhex(CID)
    bad_records = msgspec.msgpack.encode([[[cid, [[0, ["not", "a record"]]]]], []])  # a step, records broken
    scores = np.zeros(2, "<f4").tobytes()  # 2 values for a block of 1 row x 1 column
    bad_block = encode_step({}, [ProbeBlock((cid,), (1,), (4,), (3,), (0,), ((("p", 0, 1),),), 1, scores)])
    try:
        raw.send_multipart([b"one frame only"])
        raw.send_multipart(
            [b"\x93not a step", transport.mac(key, b"\x93not a step")]
        )  # authentic, undecodable
        raw.send_multipart([bad_records, transport.mac(key, bad_records)])
        raw.send_multipart([bad_block, transport.mac(key, bad_block)])
        good = encode_step({cid: [RECORD]})
        raw.send_multipart([good, transport.mac(key, good)])
        assert arrived(inbox, CID, 1) == [RECORD]  # (in order: the bad ones were handled before it)
    finally:
        raw.close(0)
    assert dropped("malformed") == before + 4


def test_a_message_over_the_size_bound_never_reaches_a_mailbox(monkeypatch):
    monkeypatch.setattr(inbox_module, "MAX_MESSAGE_BYTES", 1024)
    box = Inbox(signing.wire_key())
    try:
        box.open(CID)
        big = TokenRecord(4, 3, "s" * 4096, ())
        send(Addressee(box.address, CID), [big])  # dropped by ZeroMQ on arrival (the connection is closed)
        box.open(OTHER)
        got: list = []
        for _ in range(
            300
        ):  # sent after it, until one arrives (what was queued on the closed connection is lost)
            send(Addressee(box.address, OTHER), [RECORD])
            got = arrived(box, OTHER, 1, timeout_s=0.1)
            if got:
                break
        assert got and got[0] == RECORD  # the outbox reconnected
        assert box.take(CID) == []  # had the big one been accepted, it would have been routed first
    finally:
        box.close_socket()


def test_a_mailbox_is_bounded(inbox, monkeypatch):
    monkeypatch.setattr(inbox_module, "MAX_PENDING", 3)
    inbox.open(CID)
    before = dropped("overflow")
    for _ in range(5):
        send(Addressee(inbox.address, CID), [RECORD])
    settled(inbox, "c" * 32)
    assert len(inbox.take(CID)) == 3
    assert dropped("overflow") == before + 2


def test_a_send_to_a_gone_process_never_blocks_and_counts_what_it_drops(monkeypatch):
    """Nobody listens at the address: the peer's queue fills to its bound, then every send returns at once; a
    dropped step counts its records: 2 of one request, 3 of a probe block (3 requests), 4 of a token block (4
    rows)."""
    monkeypatch.setattr(transport, "SEND_HWM", 8)
    box = transport.Outbox(signing.wire_key())
    to = Addressee("ipc://@steer-observe-nobody-" + "0" * 8, CID)
    cids = tuple(bytes.fromhex(c) for c in (CID, OTHER, "c" * 32))
    probes = ProbeBlock(cids, (1, 2, 3), (4, 4, 7), (3, 3, 5), (0, 0, 0), ((("p", 0, 1),),), 1, bytes(12))
    tokens = TokenBlock("s", cids[:1], (4,), (1, 2, 3, 4), (1,), (0,), (False,), (0,), ((),), 0, b"", b"", bytes(16),
                        bytes(16), 0, b"")  # fmt: skip
    results = []
    try:
        for _ in range(40):
            box.post(to, [RECORD, RECORD])
            box.post_block(to.address, probes)
            box.post_block(to.address, tokens)
            results.append(box.flush() == 1)
    finally:
        box.close()
    assert results[0] is True and results[-1] is False
    assert box.dropped == (2 + 3 + 4) * results.count(False) and results.count(False) >= 40 - 16


def test_a_step_is_one_message_per_api_process(inbox):
    """Every request of a step that reports to one API process goes in one message, routed per request; a part
    for a request not open here is dropped alone."""
    other = Inbox(signing.wire_key())
    try:
        inbox.open(CID)
        inbox.open(OTHER)
        other.open(CID)
        unowned = dropped("unowned")
        transport.post(Addressee(inbox.address, CID), [RECORD])
        transport.post(Addressee(inbox.address, OTHER), [RECORD, RECORD])
        transport.post(Addressee(inbox.address, "d" * 32), [RECORD])  # not open here
        transport.post(Addressee(other.address, CID), [RECORD])
        assert transport.flush() == 2
        assert arrived(inbox, CID, 1) == [RECORD] and arrived(inbox, OTHER, 2) == [RECORD, RECORD]
        assert arrived(other, CID, 1) == [RECORD]
        assert dropped("unowned") == unowned + 1
    finally:
        other.close_socket()


def test_a_probe_block_reaches_each_request_it_names_and_no_other(inbox):
    """One block carries a step's probe scores for every request of one API process; each open request gets
    its own rows, a request not open here gets nothing (counted), and a block to an empty address is not sent."""
    inbox.open(CID)
    inbox.open(OTHER)
    unowned = dropped("unowned")
    layout = (("p", 0, 1),)
    cids = tuple(bytes.fromhex(c) for c in (CID, "d" * 32, OTHER))
    scores = np.array([[0.5], [0.25], [0.125]], "<f4").tobytes()
    transport.post_block(
        "", ProbeBlock(cids, (1, 2, 3), (4, 4, 7), (3, 3, 5), (0, 0, 0), (layout,), 1, scores)
    )
    transport.post_block(
        inbox.address, ProbeBlock(cids, (1, 2, 3), (4, 4, 7), (3, 3, 5), (0, 0, 0), (layout,), 1, scores)
    )
    assert transport.flush() == 1
    assert arrived(inbox, CID, 1) == [ProbeRecord((4,), 3, ("p",), ((0, 1),), [[0.5]])]
    assert arrived(inbox, OTHER, 1) == [ProbeRecord((7,), 5, ("p",), ((0, 1),), [[0.125]])]
    assert dropped("unowned") == unowned + 1


def test_an_empty_address_sends_nothing():
    box = transport.Outbox(signing.wire_key())
    box.post(Addressee("", CID), [RECORD])
    assert box.flush() == 0
    assert box.sockets == {} and box.dropped == 0


def test_two_api_processes_have_their_own_addresses(inbox):
    other = Inbox(signing.wire_key())
    try:
        assert other.address != inbox.address
        inbox.open(CID)
        other.open(CID)
        send(Addressee(other.address, CID), [RECORD])
        assert arrived(other, CID, 1) == [RECORD]
        assert inbox.take(CID) == []
    finally:
        other.close_socket()


def test_a_mailbox_is_bounded_in_steps_not_blocks(inbox, monkeypatch):
    """A step with many blocks for one request (an SAE each, a probe layer each) takes one place in its mailbox."""
    monkeypatch.setattr(inbox_module, "MAX_PENDING", 3)
    inbox.open(CID)
    before = dropped("overflow")
    cid = bytes.fromhex(CID)
    for step in range(3):
        for layer in range(5):
            scores = np.array([[float(layer)]], "<f4").tobytes()
            block = ProbeBlock((cid,), (1,), (10 + step,), (3,), (0,), (((f"p{layer}", 0, 1),),), 1, scores)
            transport.post_block(inbox.address, block)
        transport.post(Addressee(inbox.address, CID), [RECORD])
        assert transport.flush() == 1
    settled(inbox, "c" * 32)
    got = inbox.take(CID)
    assert len(got) == 3 * 6 and dropped("overflow") == before
