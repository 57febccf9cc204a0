"""Hostile answers from Intuit, through the client, the refresher and the scheduler.

A real daemon runs against the real simulator, both on one hand-moved clock;
the simulator's ``raw`` fault (set over its ``/_sim/`` control API) plays an
Intuit that answers any status, headers and body. Whatever it answers:

1. a 200 that carries a token pair is committed: the database holds the
   refresh token it carried, read back decrypted through the daemon's storage;
2. every account ends with a live timer (due within the longest wait the
   daemon may choose) or a terminal status;
3. no exception escapes a task: every task the event loop ran, the daemon's
   included, ended with a result or a cancellation, and the loop reported no
   error.

The named reproductions come first; the property-based test pushes arbitrary
answers through the same path and writes its figure into docs/reliability.md
after its assertions.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from qbo_daemon.core.models import Account, AccountStatus, iso
from qbo_daemon.engine.refresher import OutcomeKind
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator, RequestLogEntry, SimulatorSettings
from tests.engine.test_scheduler import Logs, advance_to, settle
from tests.harness import RunningDaemon, start_daemon, wait_for
from tests.manual_clock import ManualClock

T0 = datetime(2031, 3, 3, 9, 0, tzinfo=UTC)
BACKOFF_MAX = 20.0
HOUR = timedelta(hours=1)
# The longest a live timer may be away: a fresh token's refresh (lead 10 min before
# an hour, at most) or a retry (at most backoff_max).
LONGEST_WAIT = max(HOUR, timedelta(seconds=BACKOFF_MAX))
TERMINAL = (AccountStatus.NEEDS_RECONNECT, AccountStatus.DISCONNECTED)


# -- watching every task -----------------------------------------------------------------


@dataclass
class Escapes:
    """Every task that ended with an exception, and every error the event loop reported."""

    tasks: list[str] = field(default_factory=list)
    loop_errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.loop_errors)


@pytest.fixture
async def escapes() -> AsyncIterator[Escapes]:
    loop = asyncio.get_running_loop()
    found = Escapes()

    def watch(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else "future"
            found.tasks.append(f"{name}: {task.exception()!r}")

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        task.add_done_callback(watch)
        return task

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        found.loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    previous = loop.get_task_factory(), loop.get_exception_handler()
    loop.set_task_factory(factory)
    loop.set_exception_handler(report)
    yield found
    loop.set_task_factory(previous[0])
    loop.set_exception_handler(previous[1])


# -- one daemon and one simulator on one clock ----------------------------------------------


@dataclass
class World:
    clock: ManualClock
    sim: IntuitSimulator
    daemon: RunningDaemon
    logs: Logs
    names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def scheduler(self) -> Scheduler:
        return self.daemon.services.scheduler

    async def answer(
        self, status: int, body: bytes | str = b"", headers: list[tuple[str, str]] | None = None
    ) -> None:
        """The next token call gets exactly this answer (the control API's raw fault)."""
        raw = body if isinstance(body, bytes) else body.encode()
        fault = {
            "kind": "raw",
            "status": status,
            "headers": [list(pair) for pair in headers or []],
            "body_base64": base64.b64encode(raw).decode(),
        }
        url = f"{self.sim.base_url}/_sim/faults"
        async with self.daemon.session.post(url, json=fault) as answered:
            assert answered.status == 200, await answered.text()

    async def imported(self, account_id: str) -> dict[str, Any]:
        """A live connection minted at the simulator, moved in; its token valid for an hour."""
        grant = self.sim.grant()
        body = {
            "refresh_token": grant["refresh_token"],
            "realm_id": grant["realm_id"],
            "access_token": grant["access_token"],
            "token_expires_at": iso(self.clock.now() + HOUR),
        }
        status, answer = await self.daemon.api(
            "PUT", f"/v1/accounts/{account_id}/tokens", json=body
        )
        assert status in (200, 201), answer
        return grant

    async def stored(self, account_id: str) -> Account:
        """The row as the daemon reads it, tokens decrypted."""
        return await self.daemon.services.storage.get_account(account_id)

    def token_calls(self) -> list[RequestLogEntry]:
        return [e for e in self.sim.request_log if e.endpoint == "token"]


@pytest.fixture
async def world(tmp_path: Path, escapes: Escapes) -> AsyncIterator[World]:
    clock = ManualClock(T0)
    logs = Logs()
    configure_logging("json", "debug", stream=logs.stream)
    sim = IntuitSimulator(SimulatorSettings(), clock=clock)
    await sim.start()
    running = await start_daemon(
        sim,
        tmp_path / "daemon",
        clock=clock,
        backoff_initial="1s",
        backoff_max=f"{BACKOFF_MAX:g}s",
        log_level="debug",
    )
    await settle(running, clock)
    yield World(clock, sim, running, logs)
    await asyncio.wait_for(running.shutdown(), 30)
    await sim.close()


def assert_live_or_terminal(world: World, account: Account) -> None:
    """Invariant 2: a timer due within the longest wait, or a terminal status."""
    if account.status in TERMINAL:
        return
    due = world.scheduler.due_at(account.account_id)
    assert due is not None, f"{account.account_id} ({account.status}) has no timer"
    assert due <= world.clock.now() + LONGEST_WAIT, (account.account_id, iso(due))


# -- the named reproductions ----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    ["1000000000000", "1e12", "Fri, 31 Dec 9999 23:59:59 GMT", "9" * 4000],
    ids=["13-digits", "exponent", "year-9999", "4000-digits"],
)
async def test_a_retry_after_past_the_cap_waits_backoff_max_and_the_timer_stays(
    world: World, escapes: Escapes, header: str
) -> None:
    await world.imported("acme")
    due = world.scheduler.due_at("acme")
    assert due is not None
    await world.answer(503, "<html>busy</html>", [("Retry-After", header)])

    await advance_to(world.daemon, world.clock, due)
    await wait_for(lambda: len(world.token_calls()) == 1)
    await settle(world.daemon, world.clock)
    retry_at = world.scheduler.due_at("acme")
    assert retry_at is not None, "the account's timer vanished"
    assert timedelta(0) < retry_at - world.clock.now() <= timedelta(seconds=BACKOFF_MAX)
    [line] = world.logs.lines("refresh.retrying", account_id="acme")
    assert 0 < line["delay"] <= BACKOFF_MAX

    await advance_to(world.daemon, world.clock, retry_at)
    await wait_for(lambda: len(world.token_calls()) == 2)
    await settle(world.daemon, world.clock)
    account = await world.stored("acme")
    assert (account.status, account.failure_count) == (AccountStatus.ACTIVE, 0)
    assert world.token_calls()[-1].status == 200
    assert not escapes, escapes


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("expires_in", '"\u00b2"'),
        ("expires_in", '"\u0661\u0662"'),
        ("expires_in", "1" + "0" * 30),
        ("expires_in", "1e300"),
        ("expires_in", "9" * 5000),
        ("x_refresh_token_expires_in", "1" + "0" * 30),
        ("x_refresh_token_expires_in", '"\u00b2"'),
        ("x_refresh_token_hard_expires_in", "Infinity"),
        ("x_refresh_token_hard_expires_in", f'"{"9" * 5000}"'),
    ],
    ids=[
        "superscript",
        "arabic-indic",
        "1e30",
        "1e300",
        "5000-digits",
        "refresh-1e30",
        "refresh-superscript",
        "hard-infinity",
        "hard-5000-digit-text",
    ],
)
async def test_a_200_with_any_lifetime_commits_the_rotated_refresh_token(
    world: World, escapes: Escapes, field: str, raw: str
) -> None:
    old = await world.imported("acme")
    # A second live connection's tokens stand for the rotated ones Intuit issued.
    new = world.sim.grant()
    body = (
        f'{{"access_token": "{new["access_token"]}", "refresh_token": "{new["refresh_token"]}", '
        f'"token_type": "bearer", "{field}": {raw}}}'
    )
    await world.answer(200, body, [("Content-Type", "application/json")])

    status, answer = await world.daemon.api("POST", "/v1/accounts/acme/refresh")
    assert status == 200, answer
    account = await world.stored("acme")
    assert account.refresh_token == new["refresh_token"] != old["refresh_token"]
    assert account.access_token == new["access_token"]
    now = world.clock.now()
    assert account.token_expires_at is not None
    assert now < account.token_expires_at <= now + HOUR
    assert account.refresh_token_expires_at is not None
    assert account.refresh_token_expires_at <= now + timedelta(seconds=8_726_400)
    hard = account.refresh_token_hard_expires_at
    assert hard is None or hard <= now + timedelta(days=5 * 365 + 2)
    assert_live_or_terminal(world, account)
    assert not escapes, escapes


async def test_unprintable_words_in_an_error_answer_are_recorded_readably(
    world: World, escapes: Escapes
) -> None:
    await world.imported("acme")
    due = world.scheduler.due_at("acme")
    assert due is not None
    body = json.dumps({"error": "server\ud800error", "error_description": "down\ud800\u202e"})
    await world.answer(500, body, [("intuit_tid", "t" * 500)])

    await advance_to(world.daemon, world.clock, due)
    await wait_for(lambda: len(world.token_calls()) == 1)
    await settle(world.daemon, world.clock)
    account = await world.stored("acme")
    assert account.failure_count == 1
    assert account.last_error is not None
    assert "down??" in account.last_error
    account.last_error.encode("utf-8")
    [attempt] = await world.daemon.services.storage.attempts("acme")
    assert (attempt.outcome, attempt.intuit_tid) == ("transient", None)
    assert_live_or_terminal(world, account)
    assert not escapes, escapes


class BrokenEvents:
    """An event sink with a bug: every event raises (the one stand-in here, for a port)."""

    def emit(self, event: str, account_id: str, **fields: object) -> None:
        raise RuntimeError(f"the event sink failed on {event}")


async def test_a_failure_after_an_attempt_is_logged_and_the_timer_kept(
    world: World, escapes: Escapes
) -> None:
    grant = await world.imported("acme")
    services = world.daemon.services
    refresh = services.config.refresh
    # The daemon's own refresher and storage, under a scheduler whose events fail.
    scheduler = Scheduler(
        services.refresher,
        services.storage,
        world.clock,
        services.metrics,
        BrokenEvents(),
        concurrency=1,
        backoff_initial=refresh.backoff_initial,
        backoff_max=refresh.backoff_max,
        invalid_client_retry=refresh.invalid_client_retry,
        hard_expiry_warning=refresh.hard_expiry_warning,
    )
    await world.answer(500, '{"error": "server_error"}')
    failed = await scheduler.refresh("acme")
    assert failed.kind is OutcomeKind.TRANSIENT

    # The success after a failure emits account.recovered, which raises.
    recovered = await scheduler.refresh("acme")
    assert recovered.kind is OutcomeKind.SUCCESS
    assert scheduler.due_at("acme") == world.clock.now() + timedelta(seconds=BACKOFF_MAX)
    [line] = world.logs.lines("refresh.reschedule_failed")
    assert (line["level"], line["account_id"], line["error"]) == ("error", "acme", "RuntimeError")
    text = world.logs.stream.getvalue()
    assert grant["refresh_token"] not in text
    assert grant["access_token"] not in text
    assert not escapes, escapes
