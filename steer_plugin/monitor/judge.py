"""The probe → judge cascade (config monitoring.probes[...].judge_above, monitoring.judge).

A cheap probe scores every generated token of monitored traffic; the first token whose score passes the probe's
`judge_above` sends the conversation so far to an OpenAI-compatible judge (another vLLM, or this server) with
the configured prompt. The verdict is logged and counted; with `stop_on_positive` a positive verdict stops a
still-streaming answer. Bounded: one judge call per probe per request, `judge_per_minute` per probe and API
process, and `timeout_s` per call. A judge that fails or times out is counted and never touches the answer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from collections.abc import Callable
from typing import NamedTuple

import requests

from steer_plugin import metrics
from steer_plugin.config import MonitoringConfig
from steer_plugin.config_monitoring import JudgeConfig, ProbeMonitoring
from steer_plugin.monitor import log as monitor_log

logger = logging.getLogger("steer_plugin")
JUDGE_HEADER = "x-steer-judge"  # marks the judge's own requests to this server: never judged again
_running: set[asyncio.Task] = set()  # judge calls outlive their response: held here until they end


class Verdict(NamedTuple):
    probe: str
    label: str
    score: float  # the score that crossed judge_above
    token: int  # the generated token it predicted (0: the first)
    verdict: str  # metrics.JUDGE_OUTCOMES
    answer: str | None  # the judge's text
    seconds: float | None


class RateLimit:
    """At most `per_minute` calls in any 60 s (a sliding window of call times)."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self.calls: collections.deque[float] = collections.deque()

    def allow(self) -> bool:
        now = self.clock()
        while self.calls and now - self.calls[0] >= 60.0:
            self.calls.popleft()
        if len(self.calls) >= self.per_minute:
            return False
        self.calls.append(now)
        return True


def conversation_text(body: dict, answer: str) -> str:
    """The conversation so far as "role: text" lines: the request's messages (or prompt), the answer last."""
    lines = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):  # OpenAI content parts: their text
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                lines.append(f"{m.get('role', 'user')}: {content if isinstance(content, str) else ''}")
    elif isinstance(body.get("prompt"), str):
        lines.append(f"user: {body['prompt']}")
    lines.append(f"assistant: {answer}")
    return "\n".join(lines)


def ask_judge(config: JudgeConfig, prompt: str, token: str) -> tuple[str, str, float]:
    """One judge call (blocking; run it in a thread): (verdict, the judge's answer, seconds)."""
    headers = {JUDGE_HEADER: token}
    if config.api_key_env and os.environ.get(config.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[config.api_key_env]}"
    body = {
        "model": config.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": config.max_tokens,
        "temperature": 0,
    }
    started = time.monotonic()
    reply = requests.post(
        config.url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers, timeout=config.timeout_s
    )
    reply.raise_for_status()
    answer = reply.json()["choices"][0]["message"]["content"] or ""
    positive = re.search(config.positive, answer, re.IGNORECASE) is not None
    return ("positive" if positive else "negative"), answer, time.monotonic() - started


class Rule(NamedTuple):
    probe: str
    label: str
    column: int  # the label's class in the probe's scores
    monitoring: ProbeMonitoring


class JudgeCascade:
    """One response's cascade: fed the scores as tokens stream (`feed`), it starts at most one judge call per
    probe; `stop` is set when a positive verdict must end the answer (then `stopped_by` says which)."""

    def __init__(
        self,
        rules: list[Rule],
        config: MonitoringConfig,
        limits: dict[str, RateLimit],
        body: dict,
        token: str,
        response_id: Callable[[], str | None],
    ):
        self.rules = rules
        self.config = config
        self.limits = limits
        self.body = body
        self.token = token
        self.response_id = response_id
        self.judged: set[str] = set()
        self.stop = asyncio.Event()
        self.stopped_by: Verdict | None = None

    def feed(self, scores: dict[int, dict[str, tuple[float, ...]]], first: int, answer: str) -> None:
        """`scores`: position -> probe -> scores; `first`: the position predicting generated token 0."""
        for rule in self.rules:
            if rule.probe in self.judged:
                continue
            crossing = next(
                (
                    (pos, s[rule.probe][rule.column])
                    for pos, s in sorted(scores.items())
                    if pos >= first
                    and rule.probe in s
                    and s[rule.probe][rule.column] > rule.monitoring.judge_above
                ),
                None,
            )
            if crossing is None:
                continue
            self.judged.add(rule.probe)
            pos, score = crossing
            if not self.limits[rule.probe].allow():
                self._record(Verdict(rule.probe, rule.label, score, pos - first, "rate_limited", None, None))
                continue
            task = asyncio.get_running_loop().create_task(self._judge(rule, score, pos - first, answer))
            _running.add(task)
            task.add_done_callback(_running.discard)

    async def _judge(self, rule: Rule, score: float, token: int, answer: str) -> None:
        judge = rule.monitoring.judge or self.config.judge
        prompt = judge.prompt.replace("{probe}", f"{rule.probe} ({rule.label})").replace(
            "{conversation}", conversation_text(self.body, answer)
        )
        try:
            verdict, text, seconds = await asyncio.to_thread(ask_judge, judge, prompt, self.token)
        except requests.Timeout:
            verdict, text, seconds = "timeout", None, None
        except Exception as err:  # a judge down or answering nonsense never breaks the answer
            logger.warning("steer_plugin: judge call for probe %s failed: %s", rule.probe, err)
            verdict, text, seconds = "error", None, None
        found = Verdict(rule.probe, rule.label, score, token, verdict, text, seconds)
        self._record(found)
        if verdict == "positive" and rule.monitoring.stop_on_positive and self.stopped_by is None:
            self.stopped_by = found
            self.stop.set()

    def _record(self, verdict: Verdict) -> None:
        metrics.JUDGE_VERDICTS.labels(probe=verdict.probe, verdict=verdict.verdict).inc()
        if verdict.seconds is not None:
            metrics.JUDGE_SECONDS.labels(probe=verdict.probe).observe(verdict.seconds)
        monitor_log.write(
            self.config, {"event": "judge", "request_id": self.response_id(), **verdict._asdict()}
        )
