"""The monitoring sink (steer_plugin/monitor/log.py): the JSON line written per request, to a file or the logger,
and the per-request summary of the strongest features. Expected lines are stated here field by field."""

from __future__ import annotations

import json
import logging
import time

import pytest

from steer_plugin.config import MonitoringConfig
from steer_plugin.monitor import log
from steer_plugin.request.records import TokenRecord

RECORD = {
    "request_id": "cmpl-1",
    "sae": "demo",
    "tokens": 7,
    "top_features": [{"index": 3, "label": "bridge"}],
}


def test_file_sink_appends_one_compact_json_line_per_record(tmp_path):
    path = tmp_path / "monitor.jsonl"
    config = MonitoringConfig(sink="file", path=str(path))
    before = time.time()
    log.write(config, RECORD)
    log.write(config, {"request_id": "cmpl-2", "aborted": True})
    after = time.time()
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 2
    first, second = text.splitlines()
    got = json.loads(first)
    assert list(got) == ["ts", "request_id", "sae", "tokens", "top_features"]  # the timestamp first
    assert first == json.dumps(got, separators=(",", ":"))  # compact: no spaces between fields
    assert {k: v for k, v in got.items() if k != "ts"} == RECORD
    assert before - 0.001 <= got["ts"] <= after + 0.001 and got["ts"] == round(got["ts"], 3)
    assert json.loads(second)["request_id"] == "cmpl-2" and json.loads(second)["aborted"] is True
    assert json.loads(second)["ts"] >= got["ts"]


def test_stdout_sink_logs_the_same_line_at_info(caplog, tmp_path):
    config = MonitoringConfig()  # sink "stdout": the steer_plugin.monitor logger
    with caplog.at_level(logging.INFO, logger="steer_plugin.monitor"):
        log.write(config, RECORD)
    # One record, which pytest may capture twice: once plugin.register() ran in this process, the plugin's
    # logger hands its records to vLLM's, and pytest captures at each logger that does not propagate.
    (entry,) = {id(r): r for r in caplog.records if r.name == "steer_plugin.monitor"}.values()
    assert entry.levelno == logging.INFO
    got = json.loads(entry.getMessage())
    assert {k: v for k, v in got.items() if k != "ts"} == RECORD and isinstance(got["ts"], float)
    assert list(tmp_path.iterdir()) == []  # nothing written to a file


def record(pos: int, top: list, sae: str = "s", sink: bool = False) -> TokenRecord:
    return TokenRecord(pos=pos, num_prompt=3, sae=sae, top=tuple(tuple(t) for t in top), sink=sink)


def test_summary_ranks_features_by_their_largest_activation_over_the_request():
    records = [
        record(0, [[9, 500.0]], sink=True),  # the attention sink: left out
        record(1, [[3, 2.0], [5, 1.25]]),
        record(2, [[5, 4.123456], [3, 0.5], [8, 0.1]]),
        record(3, [[8, 3.0]], sae="other"),  # another SAE's read: left out
        record(4, [[3, 1.0]]),
    ]
    labels = {3: "bridge", 8: "water"}
    assert log.summarise(records, "s", labels, 5) == [
        {"index": 5, "max_activation": 4.1235, "tokens": 2, "label": None},
        {"index": 3, "max_activation": 2.0, "tokens": 3, "label": "bridge"},
        {"index": 8, "max_activation": 0.1, "tokens": 1, "label": "water"},
    ]
    assert [e["index"] for e in log.summarise(records, "s", labels, 2)] == [5, 3]  # top_k keeps the strongest
    assert log.summarise(records, "other", {}, 5) == [
        {"index": 8, "max_activation": 3.0, "tokens": 1, "label": None}
    ]


@pytest.mark.parametrize("records", [[], [record(0, [[1, 9.0]], sink=True)], [record(1, [])]])
def test_summary_of_a_request_with_nothing_to_rank_is_empty(records):
    assert log.summarise(records, "s", {}, 5) == []


def test_the_file_sink_is_rotated_before_it_passes_max_bytes(tmp_path):
    path = tmp_path / "monitor.jsonl"
    config = MonitoringConfig(sink="file", path=str(path), max_bytes=1000, backup_count=2)
    for i in range(100):
        log.write(config, {**RECORD, "n": i})
    assert path.stat().st_size <= 1000
    assert (tmp_path / "monitor.jsonl.1").exists() and (tmp_path / "monitor.jsonl.2").exists()
    assert not (tmp_path / "monitor.jsonl.3").exists()  # the oldest are dropped
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["n"] == 99  # the newest line is in the live file
