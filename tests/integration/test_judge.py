"""The probe -> judge cascade end to end on a real server: the server is its own judge (an OpenAI-compatible
vLLM), and a second probe's judge never answers (a socket that accepts and stays silent). A streamed answer is
stopped by the positive verdict (finish_reason "judge"), the silent judge times out, both are logged and
counted, the judge's own request is not judged again, and the server keeps serving."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import requests

from .conftest import running_server
from .probe_checks import config_entries, make_probes

pytestmark = pytest.mark.server

PORT = 18833 + int(os.environ.get("STEER_TEST_PORT_OFFSET", "0"))  # offset: parallel checkouts
BASE = f"http://127.0.0.1:{PORT}"
MESSAGES = [{"role": "user", "content": "Describe a famous landmark in detail."}]


def metric(name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in requests.get(f"{BASE}/metrics", timeout=30).text.splitlines():
        if (
            line.startswith(name + "{")
            and ",".join(sorted(line[len(name) + 1 : line.index("}")].split(","))) == want
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def silent_judge():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="module")
def server(demo_assets, steer_config_path, sae_layer, silent_judge, tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge-server")
    config = json.loads(open(steer_config_path).read())
    config["probes"] = config_entries(make_probes(folder, sae_layer))
    config["monitoring"] = {
        "sink": "file",
        "path": str(folder / "monitor.jsonl"),
        "probes": {
            # a sigmoid is always above 0: the first token is judged, and any answer of the judge is positive
            "concept": {
                "judge_above": 0.0,
                "stop_on_positive": True,
                "judge": {"url": BASE, "model": "demo", "positive": ".", "timeout_s": 120},
            },
            # a raw score is always above -1e9: judged at once by a judge that never answers
            "early": {
                "judge_above": -1e9,
                "label": "right",
                "judge": {"url": silent_judge, "model": "x", "timeout_s": 2},
            },
        },
    }
    path = folder / "steer.json"
    path.write_text(json.dumps(config))
    with running_server(demo_assets.model_dir, str(path), PORT):
        yield folder / "monitor.jsonl"


def judge_lines(log, request_id: str, count: int, timeout: float = 30) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        found = [
            r for r in map(json.loads, log.read_text().splitlines() if log.exists() else [])
            if r.get("event") == "judge" and r["request_id"] == request_id
        ]  # fmt: skip
        if len(found) >= count or time.time() > deadline:
            return found
        time.sleep(0.2)


def test_a_positive_verdict_stops_the_stream_and_a_silent_judge_times_out(server):
    before = {
        (p, v): metric("steer_judge_verdicts_total", probe=p, verdict=v)
        for p, v in (("concept", "positive"), ("early", "timeout"))
    }
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": False}}  # fmt: skip
    with requests.post(f"{BASE}/v1/chat/completions", json=body, stream=True, timeout=300) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1] if line.startswith(b"data: ")]
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert finishes == ["judge"]
    verdict = events[-1]["choices"][0]["steering"]["judge"]
    assert (verdict["probe"], verdict["label"], verdict["verdict"], verdict["token"]) == (
        "concept",
        "on",
        "positive",
        0,
    )
    text = "".join(c.get("delta", {}).get("content") or "" for e in events for c in e["choices"])
    assert 0 < len(text) and len(events) < 400  # stopped long before max_tokens
    request_id = events[0]["id"]
    lines = judge_lines(server, request_id, 2)
    assert sorted((r["probe"], r["verdict"]) for r in lines) == [
        ("concept", "positive"),
        ("early", "timeout"),
    ]
    assert (
        metric("steer_judge_verdicts_total", probe="concept", verdict="positive")
        == before["concept", "positive"] + 1
    )
    assert (
        metric("steer_judge_verdicts_total", probe="early", verdict="timeout")
        == before["early", "timeout"] + 1
    )
    # The judge's own request went through this server, monitored but never judged: the only judge events are
    # this request's two.
    time.sleep(1)
    events_all = [r for r in map(json.loads, server.read_text().splitlines()) if r.get("event") == "judge"]
    assert {r["request_id"] for r in events_all} == {request_id}
    # The stopped request left the engine; the server keeps serving.
    deadline = time.time() + 30
    while time.time() < deadline and metric("vllm:num_requests_running", model_name="demo") > 0:
        time.sleep(0.5)
    assert metric("vllm:num_requests_running", model_name="demo") == 0
    plain = requests.post(
        f"{BASE}/v1/completions", json={"model": "demo", "prompt": "Hello", "max_tokens": 3}, timeout=120,
        headers={"x-steer-judge": "not-the-token"},
    )  # fmt: skip
    assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] == "length"


def test_non_streaming_answers_are_judged_after_the_fact_and_never_cut(server):
    reply = requests.post(
        f"{BASE}/v1/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "max_tokens": 12, "temperature": 0},
        timeout=300,
    ).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and "judge" not in choice.get("steering", {})
    lines = judge_lines(server, reply["id"], 2)
    assert sorted((r["probe"], r["verdict"]) for r in lines) == [
        ("concept", "positive"),
        ("early", "timeout"),
    ]
