"""The probe -> judge cascade against a real HTTP judge (a small OpenAI-shaped server in a thread): one call per
probe per request, the rate limit, verdicts, a judge that times out or fails, and the stop on a positive one."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steer_plugin.config import parse_config
from steer_plugin.monitor import judge as judge_module
from steer_plugin.monitor.judge import JUDGE_HEADER, JudgeCascade, RateLimit, Rule, conversation_text


class Judge(ThreadingHTTPServer):
    """Answers every chat completion with `self.answer`; remembers what it was asked."""

    def __init__(self, answer: str):
        self.answer, self.asked = answer, []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N805
                body = json.loads(handler.rfile.read(int(handler.headers["content-length"])))
                self.asked.append((handler.path, dict(handler.headers), body))
                reply = json.dumps({"choices": [{"message": {"content": self.answer}}]}).encode()
                handler.send_response(200)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(len(reply)))
                handler.end_headers()
                handler.wfile.write(reply)

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def log(tmp_path):
    return tmp_path / "monitor.jsonl"


def cascade(log, judge_url: str, stop: bool = True, timeout_s: float = 5.0, per_minute: int = 10):
    config = parse_config(
        {
            "probes": [{"id": "p", "path": "/unused"}],
            "monitoring": {
                "sink": "file",
                "path": str(log),
                "judge": {
                    "url": judge_url,
                    "model": "judge",
                    "timeout_s": timeout_s,
                    "prompt": "{probe}|{conversation}",
                },
                "probes": {"p": {"judge_above": 0.5, "stop_on_positive": stop, "label": "yes"}},
            },
        }
    )
    rule = Rule("p", "yes", 1, config.monitoring.probes["p"])
    body = {"messages": [{"role": "user", "content": "hi"}]}
    return JudgeCascade([rule], config.monitoring, {"p": RateLimit(per_minute)}, body, "tok", lambda: "req-1")


def lines(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def settle():
    while judge_module._running:
        await asyncio.sleep(0.01)


def test_a_crossing_is_judged_once_and_a_positive_verdict_stops(log):
    judge = Judge("Yes, it does.")

    async def run():
        c = cascade(log, judge.url)
        c.feed({4: {"p": (0.9, 0.2)}, 5: {"p": (0.1, 0.4)}}, first=4, answer="a")  # column 1: 0.2, 0.4: no
        assert not c.judged
        c.feed({4: {"p": (0.9, 0.2)}, 5: {"p": (0.1, 0.4)}, 6: {"p": (0.0, 0.7)}}, first=4, answer="a b c")
        c.feed({7: {"p": (0.0, 0.9)}}, first=4, answer="a b c d")  # judged already: no second call
        await settle()
        return c

    c = asyncio.run(run())
    assert len(judge.asked) == 1
    path, headers, body = judge.asked[0]
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/v1/chat/completions" and headers[JUDGE_HEADER] == "tok"
    assert body["messages"][0]["content"] == "p (yes)|user: hi\nassistant: a b c" and body["temperature"] == 0
    assert c.stop.is_set() and c.stopped_by.verdict == "positive" and c.stopped_by.token == 2
    (line,) = lines(log)
    assert line["event"] == "judge" and line["request_id"] == "req-1" and line["score"] == 0.7
    assert line["verdict"] == "positive" and line["answer"] == "Yes, it does."
    judge.shutdown()


def test_negative_timeout_error_and_rate_limited_verdicts_never_stop(log):
    no = Judge("No.")
    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there: connection refused

    async def run():
        out = []
        for url, timeout in (
            (no.url, 5.0),
            (f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5),
            (refused_url, 5.0),
        ):
            c = cascade(log, url, timeout_s=timeout)
            c.feed({0: {"p": (0.0, 0.9)}}, first=0, answer="x")
            await settle()
            out.append(c)
        limited = cascade(log, no.url, per_minute=1)
        limited.limits["p"].allow()  # the minute's one call is spent
        limited.feed({0: {"p": (0.0, 0.9)}}, first=0, answer="x")
        out.append(limited)
        return out

    found = asyncio.run(run())
    assert [line["verdict"] for line in lines(log)] == ["negative", "timeout", "error", "rate_limited"]
    assert not any(c.stop.is_set() for c in found)
    no.shutdown()
    silent.close()


def test_rate_limit_is_a_sliding_minute():
    now = [0.0]
    limit = RateLimit(2, clock=lambda: now[0])
    assert limit.allow() and limit.allow() and not limit.allow()
    now[0] = 59.9
    assert not limit.allow()
    now[0] = 60.0
    assert limit.allow() and limit.allow() and not limit.allow()  # both calls of t=0 left the window


def test_conversation_text():
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    }
    assert conversation_text(body, "hello") == "system: be brief\nuser: hi\nassistant: hello"
    assert conversation_text({"prompt": "once"}, " upon") == "user: once\nassistant:  upon"


def test_judged_probes_need_a_judge():
    with pytest.raises(Exception, match="judge_above needs monitoring.judge"):
        parse_config(
            {"probes": [{"id": "p", "path": "x"}], "monitoring": {"probes": {"p": {"judge_above": 0.5}}}}
        )
    with pytest.raises(Exception, match="positive"):
        parse_config({"monitoring": {"judge": {"url": "http://x", "model": "m", "positive": "("}}})
