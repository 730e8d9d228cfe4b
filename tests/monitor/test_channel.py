"""The observation channel's files are opened like every other file: never through a link, never waiting on a
named pipe that another process of the user put in their place."""

from __future__ import annotations

import os

from steer_plugin.monitor import channel
from steer_plugin.request.records import TokenRecord


def test_a_pipe_or_link_in_place_of_a_channel_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv(channel.RUN_DIR_ENV, str(tmp_path))
    record = TokenRecord(pos=0, num_prompt=1, sae="demo", top=((1, 2.0),))
    os.mkfifo(tmp_path / ("a" * 32 + ".jsonl"))
    assert channel.ChannelReader("a" * 32).read_new() == []  # returns at once
    assert channel.append("a" * 32, []) is False
    (tmp_path / "elsewhere.jsonl").write_text("")
    (tmp_path / ("b" * 32 + ".jsonl")).symlink_to(tmp_path / "elsewhere.jsonl")
    assert channel.append("b" * 32, [record]) is False
    assert (tmp_path / "elsewhere.jsonl").read_text() == ""
    channel.create("c" * 32)
    assert channel.append("c" * 32, [record]) is True
    assert channel.ChannelReader("c" * 32).read_new() == [record]
