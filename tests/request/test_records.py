"""TokenRecord: the one type the worker writes and the API process reads, through the observation channel."""

from steer_plugin.monitor import channel
from steer_plugin.request.records import TokenRecord

CID = "d" * 32


def test_records_cross_the_channel_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv(channel.RUN_DIR_ENV, str(tmp_path))
    full = TokenRecord(7, 5, "a", ((3, 2.5), (9, 0.25)), False, 12, 0.125, ((4, -1.5),), (4, -1.5))
    bare = TokenRecord(0, 5, "b", (), sink=True)
    channel.create(CID)
    reader = channel.ChannelReader(CID)
    assert channel.append(CID, [full])
    assert reader.read_new() == [full]
    assert channel.append(CID, [bare, full])
    assert reader.read_new() == [bare, full]  # only what is new
    assert reader.read_new() == []
    reader.remove()
    assert not channel.append(CID, [full])  # closed by the API side: the worker writes nothing


def test_a_partly_written_line_waits_for_the_next_read(monkeypatch, tmp_path):
    monkeypatch.setenv(channel.RUN_DIR_ENV, str(tmp_path))
    channel.create(CID)
    reader = channel.ChannelReader(CID)
    with open(tmp_path / f"{CID}.jsonl", "a") as f:
        f.write('{"pos": 1, "P": 1, "sae": "a", "top": [[2, 1.0]]}\n{"pos": 2, "P"')
    assert reader.read_new() == [TokenRecord(1, 1, "a", ((2, 1.0),))]
    with open(tmp_path / f"{CID}.jsonl", "a") as f:
        f.write(': 1, "sae": "a", "top": [], "abort": [2, 9.5]}\n')
    assert reader.read_new() == [TokenRecord(2, 1, "a", (), abort=(2, 9.5))]
