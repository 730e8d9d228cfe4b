"""The observation cost model and its bounds (steer_plugin/observation.py): per-request refusals naming the field,
and the server-wide budget: observing requests wait in arrival order for room, get a 429 when none comes in time,
and one larger than the whole budget runs alone."""

from __future__ import annotations

import asyncio

import pytest

from steer_plugin.config import ObservationLimits
from steer_plugin.observation import ObservationBudget, ObservationCost, check_request
from steer_plugin.request.schema import SpecError


def test_the_unit_counts_prompt_recomputation_and_every_sae_read():
    cost = ObservationCost(prompt_tokens=600, generated_tokens=200, saes=2, values_per_token=80)
    assert cost.units == 600 * 3 + 200 * 2


@pytest.mark.parametrize(
    "limits, path",
    [
        ({"max_prompt_tokens": 500}, "steering.inspect.prompt"),
        ({"max_values_per_token": 64}, "steering.inspect"),
        ({"max_cost": 1000}, "steering"),
    ],
)
def test_per_request_bounds_are_403_naming_the_field(limits, path):
    cost = ObservationCost(600, 200, 1, 80)
    check_request(cost, ObservationLimits(max_prompt_tokens=None))
    with pytest.raises(SpecError) as err:
        check_request(cost, ObservationLimits(**{"max_prompt_tokens": None, **limits}))
    assert (err.value.path, err.value.status) == (path, 403)


def test_the_budget_admits_in_arrival_order_and_refuses_after_the_wait():
    async def scenario():
        budget = ObservationBudget(capacity=100, max_wait_s=0.5)
        order = []

        async def run(name, units, hold_s):
            async with budget.hold(ObservationCost(0, units, 1, 0)):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(run("a", 80, 0.2))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(run("b", 60, 0.0)), asyncio.create_task(run("c", 10, 0.0))]
        await asyncio.gather(first, *waiting)
        assert order == ["a", "b", "c"]  # c would fit beside a, but b came first
        assert budget.in_flight == 0
        blocker = asyncio.create_task(run("d", 100, 1.0))
        await asyncio.sleep(0.01)
        with pytest.raises(SpecError) as err:
            await run("e", 1, 0.0)
        assert err.value.status == 429
        await blocker
        order.clear()
        big = asyncio.create_task(run("big", 250, 0.2))  # more than the whole budget: runs alone
        await asyncio.sleep(0.01)
        small = asyncio.create_task(run("small", 1, 0.0))
        await asyncio.sleep(0.05)
        assert order == ["big"]  # the small one waits for it
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.in_flight == 0 and not budget._queue

    asyncio.run(scenario())


def test_a_client_leaving_while_it_waits_gives_its_place_back():
    async def scenario():
        budget = ObservationBudget(capacity=10, max_wait_s=5)

        async def run(units, hold_s):
            async with budget.hold(ObservationCost(0, units, 1, 0)):
                await asyncio.sleep(hold_s)

        blocker = asyncio.create_task(run(10, 0.2))
        await asyncio.sleep(0.01)
        leaver = asyncio.create_task(run(5, 0.0))
        await asyncio.sleep(0.01)
        leaver.cancel()
        await blocker
        await asyncio.wait_for(run(10, 0.0), 1)  # not blocked by the one that left
        assert budget.in_flight == 0

    asyncio.run(scenario())


def test_no_capacity_means_no_waiting():
    async def scenario():
        budget = ObservationBudget(capacity=None, max_wait_s=0)
        async with budget.hold(ObservationCost(10**6, 10**6, 4, 0)):
            pass

    asyncio.run(scenario())
