"""The scheduler's window: timers only for the accounts due within 10 minutes.

An account due later has no timer and comes back when the window moves on;
a timer whose time is not in the row (a retry's backoff) must never be
dropped, since no read of the window would bring it back. Each test runs a
real daemon against the simulator on a hand-moved clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from qbo_daemon.core.models import AccountStatus, iso
from qbo_daemon.engine.refresher import Refresher
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.engine.state import AccountStates
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from qbo_daemon.store.port import AccountChange, AccountStore, ScheduleEntry
from qbo_daemon.store.repository import Storage
from tests.harness import RunningDaemon, start_daemon
from tests.manual_clock import ManualClock

T0 = datetime(2031, 5, 1, 8, 0, tzinfo=UTC)
WINDOW = 600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def running(clock: ManualClock, tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    sim = IntuitSimulator(SimulatorSettings(), clock=clock)
    await sim.start()
    daemon = await start_daemon(sim, tmp_path / "daemon", clock=clock, backoff_max="15m")
    yield daemon
    await asyncio.wait_for(daemon.shutdown(), 30)
    await sim.close()


async def imported(running: RunningDaemon, account_id: str, expires_in: timedelta) -> None:
    """A live connection minted at the simulator and moved in, its token dying in ``expires_in``."""
    grant = running.simulator.grant()
    status, answer = await running.api(
        "PUT",
        f"/v1/accounts/{account_id}/tokens",
        json={
            "refresh_token": grant["refresh_token"],
            "realm_id": grant["realm_id"],
            "access_token": grant["access_token"],
            "token_expires_at": iso(running.services.clock.now() + expires_in),
        },
    )
    assert status in (200, 201), answer


async def test_a_backoff_heard_past_the_window_keeps_its_timer(
    running: RunningDaemon, clock: ManualClock
) -> None:
    # Another daemon failed this account eleven times: its next try is 15 minutes
    # (backoff_max) after the last, beyond this daemon's window, while the row's own
    # due time is inside the stretch already read: no read of the window would ever
    # bring the account back.
    await imported(running, "acme", timedelta(minutes=5))
    row = await running.services.storage.load("acme")
    assert row.reconnect_token_at is not None
    assert row.reconnect_token_at < clock.now() + timedelta(seconds=WINDOW)
    scheduler = running.services.scheduler
    scheduler.heard(
        AccountChange(
            account_id="acme",
            version=row.version + 1,
            status=AccountStatus.ACTIVE,
            reconnect_token_at=row.reconnect_token_at,
            failure_count=11,
            last_failure_at=clock.now(),
            origin="node-elsewhere",
        )
    )
    due = scheduler.due_at("acme")
    assert due is not None, "the account lost its timer"
    assert due == clock.now() + timedelta(minutes=15)


class SlowWindowReads:
    """The daemon's own store, whose window reads return only when let go.

    A read that is slow to come back (a large window, a busy database): what is
    committed after the read ran is not in its answer.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.read = asyncio.Event()
        self.let_go = asyncio.Event()

    async def schedule_entries(
        self, until: datetime | None = None, *, after: datetime | None = None
    ) -> list[ScheduleEntry]:
        entries = await self.storage.schedule_entries(until, after=after)
        self.read.set()
        await self.let_go.wait()
        return entries

    def __getattr__(self, name: str) -> object:
        return getattr(self.storage, name)


async def test_an_account_timed_while_the_window_is_read_keeps_its_timer(
    running: RunningDaemon, clock: ManualClock
) -> None:
    services = running.services
    assert isinstance(services.storage, Storage)
    slow = SlowWindowReads(services.storage)
    store: AccountStore = slow  # type: ignore[assignment]  # the rest is the real store's
    states = AccountStates()
    refresher = Refresher(
        store, services.intuit, clock, services.metrics, services.policy, states, concurrency=1
    )
    scheduler = Scheduler(
        refresher,
        store,
        clock,
        services.metrics,
        services.events,
        services.policy,
        states,
        concurrency=1,
        window=WINDOW,
    )
    slow.let_go.set()
    await scheduler.start()
    slow.let_go.clear()
    slow.read.clear()
    try:
        # Half the window used: the dispatcher reads the next stretch, slowly.
        clock.advance(WINDOW / 2 + 1)
        await asyncio.wait_for(slow.read.wait(), 10)
        # Meanwhile an import lands, due between the old window's end and the new one.
        await imported(running, "late", timedelta(minutes=10 + 8))
        row = await services.storage.load("late")
        assert row.reconnect_token_at is not None
        assert T0 + timedelta(seconds=WINDOW) < row.reconnect_token_at
        scheduler.schedule_account(row, trigger="import")  # as the import does
        slow.let_go.set()
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert scheduler.due_at("late") == row.reconnect_token_at, "the import lost its timer"
    finally:
        slow.let_go.set()
        await scheduler.stop(1.0)
