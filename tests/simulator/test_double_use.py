"""The simulator's evidence of a refresh token used twice: concurrently, or after its rotation.

Several daemons on one database must never present one refresh token in two
calls at once, nor present a value Intuit has already rotated out. The
simulator counts both (``concurrent_use`` and ``stale_use`` among the token
endpoint's counts, flags on the request log's entries), so that the fault
tests can assert zero of each.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from qbo_daemon.simulator.app import IntuitSimulator
from tests.simulator.test_simulator import INVALID_RT, call, connect, control, refresh, token


def double_uses(sim: IntuitSimulator) -> tuple[int, int]:
    counts = sim.stats()["token"]
    return counts.get("concurrent_use", 0), counts.get("stale_use", 0)


async def test_a_rotated_out_token_is_a_stale_use_and_garbage_is_not(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.settings.rotate_after = 0
    first = (await connect(http, sim))["refresh_token"]
    second = (await refresh(http, sim, first)).json()["refresh_token"]
    assert double_uses(sim) == (0, 0)

    stale = await refresh(http, sim, first)
    assert (stale.status, stale.json()) == (400, INVALID_RT)  # the same answer as before
    garbage = await refresh(http, sim, "sim-rt-never-issued")
    assert (garbage.status, garbage.json()) == (400, INVALID_RT)
    assert double_uses(sim) == (0, 1)
    assert [e.stale_use for e in sim.request_log[-2:]] == [True, False]

    # A value rotated out twice back is stale too; the current one is not.
    third = (await refresh(http, sim, second)).json()["refresh_token"]
    await refresh(http, sim, second)
    assert (await refresh(http, sim, third)).status == 200
    assert double_uses(sim) == (0, 2)


async def test_a_stale_token_is_counted_even_when_a_fault_answers(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.settings.rotate_after = 0
    first = (await connect(http, sim))["refresh_token"]
    await refresh(http, sim, first)
    sim.inject("503")
    assert (await refresh(http, sim, first)).status == 503
    assert double_uses(sim) == (0, 1)
    assert sim.request_log[-1].stale_use


async def test_two_calls_presenting_one_token_at_once_are_a_concurrent_use(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    other = sim.grant()["refresh_token"]
    sim.settings.latency = 0.3

    both = await asyncio.gather(refresh(http, sim, rt), refresh(http, sim, rt))
    assert [a.status for a in both] == [200, 200]  # answered as before: only counted
    assert double_uses(sim) == (1, 0)
    assert sorted(e.concurrent_use for e in sim.request_log) == [False, True]

    # One after the other, or two different tokens at once: no concurrent use.
    await refresh(http, sim, rt)
    await asyncio.gather(refresh(http, sim, rt), refresh(http, sim, other))
    assert double_uses(sim) == (1, 0)


async def test_a_call_the_simulator_still_holds_makes_the_next_one_concurrent(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject("hang")
    held = asyncio.create_task(refresh(http, sim, rt))
    for _ in range(500):  # until the simulator holds the call
        if sim.request_log:
            break
        await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as second:
        assert (await refresh(second, sim, rt)).status == 200
    assert double_uses(sim) == (1, 0)
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)


async def test_a_call_given_up_by_its_client_is_no_longer_being_answered(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject("hang")
    data = {"grant_type": "refresh_token", "refresh_token": rt}
    with pytest.raises(TimeoutError):
        await token(http, sim, data, client_timeout=0.2)
    await asyncio.sleep(0.3)  # the simulator notices the client left within 50 ms
    assert (await refresh(http, sim, rt)).status == 200
    assert double_uses(sim) == (0, 0)


async def test_the_control_api_shows_both_counts_and_flags(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.settings.rotate_after = 0
    sim.settings.latency = 0.2
    first = (await connect(http, sim))["refresh_token"]
    await asyncio.gather(refresh(http, sim, first), refresh(http, sim, first))

    stats = (await control(http, sim, "GET", "stats")).json()
    # Both calls presented the live value at once; the one answered second found it
    # rotated out by the first: a concurrent use that is also a stale one.
    assert stats["token"]["concurrent_use"] == 1
    assert stats["token"]["stale_use"] == 1
    entries = (await control(http, sim, "GET", "log")).json()["entries"]
    refreshes = [e for e in entries if e["grant_type"] == "refresh_token"]
    assert sum(e["concurrent_use"] for e in refreshes) == 1
    assert sum(e["stale_use"] for e in refreshes) == 1
    assert sorted(e["status"] for e in refreshes) == [200, 400]

    assert (await control(http, sim, "POST", "reset")).status == 200
    assert double_uses(sim) == (0, 0)
    answer = await call(http, "GET", f"{sim.base_url}/_sim/stats")
    assert "concurrent_use" not in answer.json()["token"]
