from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from qbo_daemon.runtime.logs import reset_logging
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from tests.harness import RunningDaemon, start_daemon
from tests.pg import fresh_database

StartDaemon = Callable[..., Awaitable[RunningDaemon]]


def pytest_addoption(parser: pytest.Parser) -> None:
    # The fault tests (tests/faults/) read it: kill -9 rounds per crash run.
    parser.addoption(
        "--rounds",
        type=int,
        default=20,
        help="kill -9 rounds per crash test in tests/faults (default 20)",
    )


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    reset_logging()


@pytest.fixture
async def simulator() -> AsyncIterator[IntuitSimulator]:
    sim = IntuitSimulator(SimulatorSettings())
    await sim.start()
    yield sim
    await sim.close()


@pytest.fixture
async def daemon_factory(simulator: IntuitSimulator, tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start real daemons against ``simulator``; all are stopped at the end."""
    started: list[RunningDaemon] = []

    async def start(name: str = "daemon", **kwargs: Any) -> RunningDaemon:
        running = await start_daemon(simulator, tmp_path / name, **kwargs)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.shutdown()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a fresh PostgreSQL database, dropped after the test (tests/pg.py).

    Skipped when no server answers, failed instead when ``CI=true``.
    """
    async with fresh_database() as url:
        yield url
