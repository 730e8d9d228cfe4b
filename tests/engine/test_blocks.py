"""Packing a step's reads per API process (engine/blocks.py): which requests go where."""

from typing import NamedTuple

from steer_plugin.engine.blocks import by_api_process
from steer_plugin.request.wire import Addressee


class Group(NamedTuple):
    to: Addressee


def groups(*addresses: str) -> list[Group]:
    return [Group(Addressee(a, f"{i:032x}")) for i, a in enumerate(addresses)]


def test_requests_are_grouped_by_the_api_process_they_reply_to():
    assert by_api_process(groups("ipc://@a", "ipc://@a", "ipc://@a")) == {"ipc://@a": [0, 1, 2]}
    assert by_api_process(groups("ipc://@a", "ipc://@b", "", "ipc://@a")) == {
        "ipc://@a": [0, 3],
        "ipc://@b": [1],
    }


def test_requests_with_nowhere_to_reply_go_nowhere():
    assert by_api_process(groups("", "")) == {}
    assert by_api_process(groups("", "ipc://@a")) == {"ipc://@a": [1]}
    assert by_api_process([]) == {}
