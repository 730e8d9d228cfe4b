"""What observing a request costs the server, and the operator's bounds on it (policy.observation).

A request that asks to observe (`inspect`, traced `inspect.features`, `abort_when`) makes the workers encode its
residuals through full SAEs and the API process stream the features back, and `inspect.prompt` also makes the
engine compute its whole prompt again instead of reading it from the prefix cache. Any client could buy that for
everyone, so it is counted in one unit, the token-encode:

    cost = prompt positions observed × (1 + SAEs read) + generated positions × SAEs read

(an observed prompt position is computed once more through the model, and every observed position is encoded
through each SAE read), and what is streamed per token is `values_per_token` = top_k × SAEs inspected + traced
features. Per request, `policy.observation` bounds the prompt positions, the values per token and the cost (a 403
naming the field); server-wide, the cost of the observing requests running at once (`max_cost_in_flight`): a
request that does not fit waits, in arrival order, up to `max_wait_s`, then gets a 429 (one costing more than the
whole budget runs alone, once no other observing request runs). Plain requests never wait and are never counted.
Monitoring the operator configured is the operator's own cost: it is not counted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

from steer_plugin import metrics
from steer_plugin.config import ObservationLimits
from steer_plugin.request.schema import SpecError


class ObservationCost(NamedTuple):
    prompt_tokens: int  # prompt positions observed (inspect.prompt), 0 otherwise
    generated_tokens: int  # generated positions observed (the request's max_tokens, times n)
    saes: int  # SAEs each observed position is encoded through
    values_per_token: int  # feature values streamed per token: top_k × SAEs inspected + traced features

    @property
    def units(self) -> int:
        return self.prompt_tokens * (1 + self.saes) + self.generated_tokens * self.saes


def check_request(cost: ObservationCost, limits: ObservationLimits, prefix: str = "steering") -> None:
    """403 naming the field when one request's observation is over the policy's per-request bounds."""
    if limits.max_prompt_tokens is not None and cost.prompt_tokens > limits.max_prompt_tokens:
        raise _refused(
            f"{prefix}.inspect.prompt",
            f"observing {cost.prompt_tokens} prompt tokens; at most {limits.max_prompt_tokens} here",
        )
    if limits.max_values_per_token is not None and cost.values_per_token > limits.max_values_per_token:
        raise _refused(
            f"{prefix}.inspect",
            f"top_k x SAEs + traced features is {cost.values_per_token}; at most "
            f"{limits.max_values_per_token} values per token here",
        )
    if limits.max_cost is not None and cost.units > limits.max_cost:
        raise _refused(
            prefix,
            f"observation costs {cost.units} token-encodes (prompt {cost.prompt_tokens} x (1 + {cost.saes}) + "
            f"generation {cost.generated_tokens} x {cost.saes}); at most {limits.max_cost} per request here",
        )


def _refused(path: str, message: str) -> SpecError:
    metrics.OBSERVATION_REFUSED.labels(reason="request").inc()
    return SpecError(path, message, status=403)


class ObservationBudget:
    """The server-wide bound: the cost of the observing requests running at once stays within `capacity`
    (None: no bound). Requests that do not fit wait in arrival order (first come, first served: a large request
    at the head is not overtaken), each at most `max_wait_s`; a request costing more than `capacity` runs alone
    (it is admitted when nothing else is in flight)."""

    def __init__(self, capacity: int | None, max_wait_s: float):
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self._queue: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def hold(self, cost: ObservationCost, prefix: str = "steering") -> AsyncIterator[None]:
        """Run the body with `cost` counted in flight (after waiting for room); SpecError 429 when no room came
        within max_wait_s."""
        units = cost.units
        metrics.OBSERVATION_COST.labels(kind="prompt").inc(cost.prompt_tokens * (1 + cost.saes))
        metrics.OBSERVATION_COST.labels(kind="generation").inc(cost.generated_tokens * cost.saes)
        if self.capacity is not None:
            await self._acquire(units, prefix)
        metrics.OBSERVATION_IN_FLIGHT.inc(units)
        try:
            yield
        finally:
            metrics.OBSERVATION_IN_FLIGHT.dec(units)
            if self.capacity is not None:
                self.in_flight -= units
                self._wake()

    async def _acquire(self, units: int, prefix: str) -> None:
        start = time.monotonic()
        if not self._queue and self._fits(units):
            self.in_flight += units
            metrics.OBSERVATION_WAIT.observe(0.0)
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (units, waiter)
        self._queue.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.max_wait_s)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted as the wait ran out: keep it
                metrics.OBSERVATION_WAIT.observe(time.monotonic() - start)
                return
            self._remove(entry)
            metrics.OBSERVATION_REFUSED.labels(reason="busy").inc()
            raise SpecError(
                prefix,
                f"the server's observation capacity ({self.capacity} token-encodes) stayed in use for "
                f"{self.max_wait_s:g} s; retry later",
                status=429,
            ) from None
        except BaseException:  # the client went away while waiting
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= units
            self._remove(entry)
            self._wake()
            raise
        metrics.OBSERVATION_WAIT.observe(time.monotonic() - start)

    def _remove(self, entry) -> None:
        try:
            self._queue.remove(entry)
        except ValueError:
            pass
        self._wake()

    def _fits(self, units: int) -> bool:
        return self.in_flight + units <= self.capacity or self.in_flight == 0

    def _wake(self) -> None:
        """Grant room to the waiters at the head of the queue, in order, while they fit."""
        while self._queue and self._fits(self._queue[0][0]):
            units, waiter = self._queue.popleft()
            if waiter.done():
                continue
            self.in_flight += units
            waiter.set_result(None)
