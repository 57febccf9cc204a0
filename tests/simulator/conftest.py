"""Fixtures of the simulator tests: a simulator on a manual clock, and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest

from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from tests.manual_clock import ManualClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[IntuitSimulator]:
    simulator = IntuitSimulator(SimulatorSettings(), clock)
    await simulator.start()
    yield simulator
    await simulator.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session
