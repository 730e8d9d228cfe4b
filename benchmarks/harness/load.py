"""The load generator: streaming /v1/completions requests, `concurrency` at a time, over loopback; per request its
time to the first token (TTFT), the gaps between streamed chunks and the output tokens; per batch of requests
(a unit) tokens/s and the percentiles of both.

    results = run_requests(server.completions_url, bodies, concurrency=4, timeout_s=600)
    stats = LoadStats.of(results)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

# The fields of a standard completion chunk: any other is reported (the plugin's `steering` field, for example).
STD_TOP = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "kv_transfer_params",
           "service_tier"}  # fmt: skip
STD_CHOICE = {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids",
              "prompt_logprobs"}  # fmt: skip


def completion_body(
    model: str, prompt: str, max_tokens: int, salt: str, *, stream: bool = True, logprobs: int | None = None
) -> dict:
    """A greedy /v1/completions request of exactly max_tokens tokens (ignore_eos) with its own cache_salt (no
    prefix-cache hits); streamed with the usage in the last chunk, or not streamed (`stream=False`)."""
    body: dict = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                  "temperature": 0.0}  # fmt: skip
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if logprobs is not None:
        body["logprobs"] = logprobs
    body["cache_salt"] = salt
    return body


@dataclass
class ReqResult:
    """One streamed request."""

    ok: bool
    error: str = ""
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0
    extra_fields: set[str] = field(default_factory=set)
    inspect_tokens: int = 0  # per-token feature records in choice.steering.tokens (inspect)
    inspect_sample: object = None  # the first such record, for the report


class LoadResult(NamedTuple):
    results: list[ReqResult]
    elapsed_s: float  # from the first request sent to the last one finished


async def stream_one(session, url: str, body: dict) -> ReqResult:
    res = ReqResult(ok=False, start=time.perf_counter())
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                res.end = time.perf_counter()
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                res.extra_fields |= set(obj) - STD_TOP
                usage = obj.get("usage")
                if usage:
                    res.tokens = int(usage.get("completion_tokens") or 0)
                choices = obj.get("choices") or []
                if not choices:
                    continue
                for ch in choices:
                    res.extra_fields |= set(ch) - STD_CHOICE
                    steering = ch.get("steering")
                    if isinstance(steering, dict) and steering.get("tokens"):
                        res.inspect_tokens += len(steering["tokens"])
                        if res.inspect_sample is None:
                            res.inspect_sample = steering["tokens"][0]
                res.chunks += 1
                if last is None:
                    res.ttft = now - res.start
                else:
                    res.gaps.append(now - last)
                last = now
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no content chunk"
    except Exception as err:  # noqa: BLE001 - a failed request is data, not a crash
        res.error = f"{type(err).__name__}: {err}"
    res.end = time.perf_counter()
    return res


async def run_requests_async(url: str, bodies: list[dict], concurrency: int, timeout_s: float) -> LoadResult:
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results: list[ReqResult] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker():
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_one(session, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return LoadResult(results, elapsed)


def run_requests(url: str, bodies: list[dict], concurrency: int, timeout_s: float) -> LoadResult:
    """Send every body (streaming), `concurrency` in flight at a time; the results in the order they finished."""
    return asyncio.run(run_requests_async(url, bodies, concurrency, timeout_s))


def complete(url: str, body: dict, timeout_s: float = 300) -> dict:
    """The first choice of one non-streaming completion (body as sent to /v1/completions, url the server's)."""
    import requests

    resp = requests.post(url + "/v1/completions", json=body, timeout=timeout_s)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    return resp.json()["choices"][0]


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1), linear between the nearest ranks; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass
class LoadStats:
    """What a unit's report records of its requests (as_dict: in this order)."""

    requests: int
    ok: int
    errors: int
    first_error: str | None
    output_tokens: int
    tokens_per_request: list[int]
    chunks_per_request: float
    elapsed_s: float
    tok_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None  # inter-token latency: the gap between streamed chunks
    itl_p99_ms: float | None
    itl_mean_ms: float | None
    extra_response_fields: list[str]
    inspect_tokens: int
    inspect_sample: object

    @classmethod
    def of(cls, load: LoadResult) -> LoadStats:
        results, elapsed = load
        ok = [r for r in results if r.ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        gaps = [g for r in ok for g in r.gaps]
        tokens = sum(r.tokens for r in ok)
        errors = [r.error for r in results if not r.ok]
        return cls(
            requests=len(results),
            ok=len(ok),
            errors=len(errors),
            first_error=errors[0] if errors else None,
            output_tokens=tokens,
            tokens_per_request=sorted({r.tokens for r in ok}),
            chunks_per_request=round(statistics.mean(r.chunks for r in ok), 2) if ok else 0,
            elapsed_s=round(elapsed, 4),
            tok_s=round(tokens / elapsed, 3) if elapsed > 0 else 0.0,
            ttft_p50_ms=_ms(pct(ttfts, 0.5)),
            ttft_p99_ms=_ms(pct(ttfts, 0.99)),
            itl_p50_ms=_ms(pct(gaps, 0.5)),
            itl_p99_ms=_ms(pct(gaps, 0.99)),
            itl_mean_ms=_ms(statistics.mean(gaps)) if gaps else None,
            extra_response_fields=sorted(set().union(*(r.extra_fields for r in results))),
            inspect_tokens=sum(r.inspect_tokens for r in results),
            inspect_sample=next((r.inspect_sample for r in results if r.inspect_sample is not None), None),
        )

    def as_dict(self) -> dict:
        return asdict(self)
