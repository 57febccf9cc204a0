"""The refresh scheduler against the design's Timing rules, with a hand-moved clock.

A real daemon runs against the real simulator, both reading one
:class:`ManualClock`, so Intuit's expiries follow the same time as the
daemon's timers. Time moves only when a test says so; between moves the test
waits, in real time, until the daemon is quiet again (no refresh in flight and
the dispatcher asleep on the clock). What is asserted is what an operator
would look at: the simulator's request log, the rows, the API and the log lines.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.core.models import iso, parse_iso
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator, RequestLogEntry, SimulatorSettings
from qbo_daemon.store.crypto import generate_key
from qbo_daemon.store.repository import Storage
from tests.figures import write_figure
from tests.harness import RunningDaemon, attempts, next_refresh, run_daemon, wait_for
from tests.manual_clock import ManualClock

T0 = datetime(2031, 3, 3, 9, 0, tzinfo=UTC)
TOKEN_PATH = "/oauth2/v1/tokens/bearer"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the simulator, served with a gauge of token calls in flight ------------------------


@dataclass
class Gauge:
    """Token calls as the simulator's server sees them: how many at once, in what order."""

    in_flight: int = 0
    peak: int = 0
    arrivals: list[str | None] = field(default_factory=list)  # presented refresh tokens

    def middleware(self) -> Any:
        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path != TOKEN_PATH:
                return await handler(request)
            form = await request.post()  # aiohttp keeps it for the handler
            presented = form.get("refresh_token")
            self.arrivals.append(presented if isinstance(presented, str) else None)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        return count


@dataclass
class Intuit:
    sim: IntuitSimulator
    gauge: Gauge

    @property
    def settings(self) -> SimulatorSettings:
        return self.sim.settings

    def refreshes(self) -> list[RequestLogEntry]:
        """Refresh-token calls the simulator answered (or dropped), in log order."""
        return [
            e
            for e in self.sim.request_log
            if e.endpoint == "token" and e.grant_type == "refresh_token"
        ]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def intuit(clock: ManualClock) -> AsyncIterator[Intuit]:
    sim = IntuitSimulator(SimulatorSettings(), clock=clock)
    gauge = Gauge()
    app = sim.make_app()
    app.middlewares.append(gauge.middleware())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    sim.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield Intuit(sim, gauge)
    await runner.cleanup()


# -- log lines ---------------------------------------------------------------------------


class Logs:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        found = []
        for text in self.stream.getvalue().splitlines():
            line = json.loads(text)
            if event is not None and line.get("event") != event:
                continue
            if all(line.get(key) == value for key, value in match.items()):
                found.append(line)
        return found


@pytest.fixture
def logs() -> Logs:
    captured = Logs()
    configure_logging("json", "debug", stream=captured.stream)
    return captured


# -- daemons -------------------------------------------------------------------------------


Start = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start(
    intuit: Intuit, clock: ManualClock, tmp_path: Path, logs: Logs
) -> AsyncIterator[Start]:
    """Start a daemon on ``clock`` against ``intuit``; ``refresh`` adds ``[refresh]`` keys."""
    running: list[RunningDaemon] = []
    key = generate_key()

    async def start_daemon(
        name: str = "daemon",
        *,
        lead: str = "10m",
        backoff_initial: str = "1s",
        backoff_max: str = "20s",
        **refresh: str | int,
    ) -> RunningDaemon:
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        api_key = "test-api-key-" + generate_key()[:16]
        text = simulator_config_text(
            intuit.sim,
            data_dir=data_dir,
            api_port=free_port(),
            callback_port=free_port(),
            api_key=api_key,
            encryption_key=key,
            lead=lead,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            log_level="debug",
        )
        for name, value in refresh.items():
            line = f"{name} = {json.dumps(value)}"
            text, replaced = re.subn(rf"(?m)^{name} = .*$", line, text)
            if not replaced:
                text = text.replace("[refresh]\n", f"[refresh]\n{line}\n", 1)
        config_path = data_dir / "config.toml"
        config_path.write_text(text, encoding="utf-8")
        daemon_ = await run_daemon(
            config_path, intuit.sim, api_key=api_key, encryption_key=key, clock=clock
        )
        running.append(daemon_)
        await settle(daemon_, clock)
        return daemon_

    yield start_daemon
    for daemon_ in reversed(running):
        if not daemon_.task.done():
            await daemon_.shutdown()
        elif not daemon_.session.closed:
            await daemon_.session.close()


async def stop_daemon(running: RunningDaemon) -> None:
    await asyncio.wait_for(running.shutdown(), 30)


# -- moving time ---------------------------------------------------------------------------


async def settle(running: RunningDaemon, clock: ManualClock, *, timeout: float = 20.0) -> None:
    """Wait (real time) until no refresh is in flight and the dispatcher sleeps on ``clock``.

    The quiet state must hold over a few checks: between a refresh finishing and
    the dispatcher going back to sleep there are a few loop turns without I/O.
    """
    scheduler = running.services.scheduler
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet = 0
    while quiet < 4:
        if scheduler.in_flight == 0 and scheduler.idle and clock.sleepers >= 1:
            quiet += 1
        else:
            quiet = 0
        if loop.time() > deadline:
            raise AssertionError(f"the daemon did not settle within {timeout}s")
        await asyncio.sleep(0.005)


async def advance(running: RunningDaemon, clock: ManualClock, seconds: float) -> None:
    """Move both clocks by ``seconds`` at once, then let the daemon do what is due.

    The daemon settles first: a dispatcher still deciding how long to sleep when
    the clocks move would count its sleep from the new time and miss what is due.
    """
    await settle(running, clock)
    clock.advance(seconds)
    # Monotonic time is a float: a sleep of exactly ``seconds`` may be left a rounding
    # error short. A nanosecond more wakes it without moving the (microsecond) wall.
    while (wake := clock.next_wake()) is not None and wake <= 1e-6:
        clock.advance(1e-9)
    await settle(running, clock)


async def advance_to(running: RunningDaemon, clock: ManualClock, when: datetime) -> None:
    seconds = (when - clock.now()).total_seconds()
    assert seconds >= 0, f"{iso(when)} is in the past"
    await advance(running, clock, seconds)


# -- accounts ------------------------------------------------------------------------------


async def account(running: RunningDaemon, account_id: str) -> dict[str, Any]:
    status, body = await running.api("GET", f"/v1/accounts/{account_id}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def at(body: dict[str, Any], name: str) -> datetime:
    value = parse_iso(body[name])
    assert value is not None, name
    return value


def row(running: RunningDaemon, account_id: str) -> sqlite3.Row:
    with sqlite3.connect(running.database) as db:
        db.row_factory = sqlite3.Row
        found = db.execute("SELECT * FROM accounts WHERE account_id = ?", (account_id,)).fetchone()
    assert isinstance(found, sqlite3.Row)
    return found


async def imported(
    running: RunningDaemon, intuit: Intuit, account_id: str, *, expires_in: float, **extra: Any
) -> str:
    """A connection minted at the simulator, moved in through the import API.

    Returns its refresh token.
    """
    grant = intuit.sim.grant()
    body = {
        "refresh_token": grant["refresh_token"],
        "realm_id": grant["realm_id"],
        "access_token": grant["access_token"],
        "token_expires_at": iso(running.services.clock.now() + timedelta(seconds=expires_in)),
        **extra,
    }
    status, answer = await running.api("PUT", f"/v1/accounts/{account_id}/tokens", json=body)
    assert status in (200, 201), answer
    return str(grant["refresh_token"])


# -- the timer -----------------------------------------------------------------------------


async def connected(running: RunningDaemon, clock: ManualClock, account_id: str) -> datetime:
    """Connect ``account_id`` through the real flow, let the daemon settle, return its due time."""
    assert await running.connect(account_id) == 200
    await settle(running, clock)
    return at(await account(running, account_id), "reconnect_token_at")


async def test_refresh_fires_at_reconnect_token_at_not_earlier_not_later(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start()
    assert await running.connect("acme") == 200
    await settle(running, clock)
    before = await account(running, "acme")
    due = at(before, "reconnect_token_at")
    assert at(before, "token_expires_at") - due == timedelta(minutes=10)
    assert before["next_refresh_at"] == before["reconnect_token_at"]

    await advance_to(running, clock, due - timedelta(seconds=1))
    assert intuit.refreshes() == []

    await advance(running, clock, 1)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    [call] = intuit.refreshes()
    assert call.at == due
    assert call.status == 200

    await settle(running, clock)
    after = await account(running, "acme")
    assert at(after, "last_refreshed_at") == due
    # Expiry counts from when the request was sent, Intuit's expires_in after it.
    assert at(after, "token_expires_at") == due + timedelta(seconds=3600)
    assert at(after, "reconnect_token_at") == due + timedelta(seconds=3000)
    [attempt] = attempts(running.database, "acme")
    assert (attempt.outcome, attempt.started_at) == ("success", due)
    assert attempt.intuit_tid == call.intuit_tid
    [line] = logs.lines("refresh.succeeded", account_id="acme")
    assert line["next_due"] == after["reconnect_token_at"]
    assert line["intuit_tid"] == call.intuit_tid


async def test_a_wall_clock_jump_is_caught_within_one_max_wait(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start()
    due = await connected(running, clock, "acme")

    # A laptop wakes from a 2-hour suspend: wall time moved, asyncio's monotonic did not.
    clock.jump_wall(timedelta(hours=2))
    jumped = clock.now()
    assert jumped > due + timedelta(minutes=10)  # even the access token died meanwhile
    await settle(running, clock)
    assert intuit.refreshes() == []
    wake = clock.next_wake()
    assert wake is not None
    assert 0 < wake <= 30.0

    await advance(running, clock, wake - 0.001)
    assert intuit.refreshes() == []
    await advance(running, clock, 0.001)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    [call] = intuit.refreshes()
    assert call.status == 200
    assert timedelta(0) < call.at - jumped <= timedelta(seconds=30)
    await settle(running, clock)
    after = await account(running, "acme")
    assert after["status"] == "active"
    assert at(after, "token_expires_at") == call.at + timedelta(seconds=3600)


# -- failures ------------------------------------------------------------------------------


async def test_transient_faults_are_retried_with_growing_capped_delays_then_succeed(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start(backoff_initial="1s", backoff_max="20s")
    due = await connected(running, clock, "acme")
    faults = ["500", "502_html", "malformed", "reset", "no_token", "500", "502_html", "500"]
    for kind in faults:
        intuit.sim.inject(kind, retry_after=0 if kind == "429" else None)

    await advance_to(running, clock, due)
    delays = []
    for attempt, kind in enumerate(faults, start=1):
        await wait_for(lambda n=attempt: len(intuit.refreshes()) == n)
        assert intuit.refreshes()[-1].fault == kind
        await settle(running, clock)
        [line] = logs.lines("refresh.retry_scheduled", account_id="acme", attempt=attempt)
        assert line["level"] == "warning"
        delay = line["delay"]
        cap = min(20.0, 1.0 * 2 ** (attempt - 1))
        assert 0 < delay <= cap, (attempt, delay, cap)
        delays.append(delay)
        body = await account(running, "acme")
        assert (body["status"], body["failure_count"]) == ("active", attempt)
        assert body["last_error"]
        retry_at = running.services.scheduler.due_at("acme")
        assert retry_at is not None
        assert abs((retry_at - clock.now()).total_seconds() - delay) < 0.001
        if delay > 0.002:
            await advance_to(running, clock, retry_at - timedelta(milliseconds=1))
            assert len(intuit.refreshes()) == attempt  # not before its time
        await advance_to(running, clock, retry_at)

    await wait_for(lambda: len(intuit.refreshes()) == len(faults) + 1)
    await settle(running, clock)
    calls = intuit.refreshes()
    assert calls[-1].status == 200
    # Full jitter draws from [0, cap]; with caps 8..20 not all draws stay under 1 s.
    assert max(delays[3:]) > 1.0, delays
    # The same refresh token every time: Intuit never saw a newer one from us.
    assert len({c.presented_refresh_token for c in calls}) == 1
    body = await account(running, "acme")
    assert (body["status"], body["failure_count"], body["last_error"]) == ("active", 0, None)
    [recovered] = logs.lines("account.recovered", account_id="acme")
    assert recovered["after_failures"] == len(faults)
    outcomes = [a.outcome for a in attempts(running.database, "acme")]
    assert outcomes == ["success"] + ["transient"] * len(faults)


@pytest.mark.parametrize("kind", ["503", "429"])
async def test_retry_after_is_honoured(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs, kind: str
) -> None:
    # Retry-After is a floor under the backoff up to its cap (backoff_max).
    running = await start(backoff_initial="1s", backoff_max="5m")
    due = await connected(running, clock, "acme")
    intuit.sim.inject(kind, retry_after=120)

    await advance_to(running, clock, due)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)
    [line] = logs.lines("refresh.retry_scheduled", account_id="acme")
    assert line["delay"] == 120
    assert running.services.scheduler.due_at("acme") == due + timedelta(seconds=120)

    await advance(running, clock, 119.9)
    assert len(intuit.refreshes()) == 1
    await advance(running, clock, 0.1)
    await wait_for(lambda: len(intuit.refreshes()) == 2)
    first, second = intuit.refreshes()
    assert (first.status, second.status) == (int(kind), 200)
    assert second.at - first.at == timedelta(seconds=120)


async def test_retries_go_on_past_token_expiry_until_the_refresh_token_dies(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    intuit.settings.update(refresh_expires_in=2 * 3600)
    # The cap once expired as long as backoff_max: two hours at the (shorter) default
    # would be hundreds of retries.
    running = await start(backoff_initial="1s", backoff_max="5m", backoff_max_expired="5m")
    assert await running.connect("acme") == 200
    await settle(running, clock)
    before = await account(running, "acme")
    due = at(before, "reconnect_token_at")
    expires = at(before, "token_expires_at")
    refresh_dies = at(before, "refresh_token_expires_at")
    assert refresh_dies == T0 + timedelta(hours=2)
    intuit.sim.inject("500", 10_000)

    await advance_to(running, clock, due)
    seen_expired = False
    for _ in range(200):
        retry_at = running.services.scheduler.due_at("acme")
        if retry_at is None:
            break
        body = await account(running, "acme")
        if clock.now() > expires:
            # The access token is dead, the connection is not: reported as expired.
            assert body["status"] == "expired"
            seen_expired = True
        else:
            assert body["status"] == "active"
        await advance_to(running, clock, retry_at)
    assert seen_expired

    calls = intuit.refreshes()
    times = [c.at for c in calls]
    assert times[0] == due
    assert all(c.status == 500 for c in calls)
    assert times[-1] < refresh_dies
    late = [t for t in times if t > expires]
    assert len(late) >= 10, "retries stopped at token_expires_at"
    # Past expiry the delay is the capped backoff, jittered in [max/2, max].
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(late)]
    assert all(150 <= gap <= 300 for gap in gaps), gaps
    early = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap <= 300 for gap in early)

    # At the refresh token's death: needs_reconnect, without asking Intuit.
    body = await account(running, "acme")
    assert body["status"] == "needs_reconnect"
    assert "expired" in body["last_error"]
    [attempt, *_] = attempts(running.database, "acme")
    assert (attempt.outcome, attempt.started_at) == ("expired", refresh_dies)
    [line] = logs.lines("account.reconnect_needed", account_id="acme")
    assert line["level"] == "error"
    await advance(running, clock, 3600)
    assert len(intuit.refreshes()) == len(calls)


async def test_a_dead_token_is_read_back_at_once_not_at_the_next_backoff_slot(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    # The caps of a production config: backoff_max 5 min, backoff_max_expired its default.
    running = await start(backoff_initial="1s", backoff_max="5m")
    intuit.sim.inject("503", retry_after=2)
    await imported(running, intuit, "acme", expires_in=-60)  # its access token died
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)
    failed_at = clock.now()
    [first] = intuit.refreshes()
    assert (first.status, first.at) == (503, failed_at)
    body = await account(running, "acme")
    assert body["status"] == "expired"
    [line] = logs.lines("refresh.retry_scheduled", account_id="acme")
    assert line["status"] == "expired"
    # Capped by backoff_max_expired (30 s) in its upper half, not by backoff_max (150-300 s).
    assert 15 <= line["delay"] <= 30, line
    retry_in = (at(body, "next_refresh_at") - failed_at).total_seconds()
    assert abs(retry_in - line["delay"]) < 0.001

    # Retry-After has passed; the timed retry has not come. The app reads its token.
    await advance(running, clock, 2)
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200, token
    assert intuit.sim.is_access_token_valid(token["access_token"])
    first, second = intuit.refreshes()
    assert (second.status, second.at) == (200, failed_at + timedelta(seconds=2))
    await settle(running, clock)
    body = await account(running, "acme")
    assert (body["status"], body["failure_count"]) == ("active", 0)
    assert len(intuit.refreshes()) == 2  # the timed retry is gone with the failure
    down = (second.at - failed_at).total_seconds()
    write_figure(
        "dead-token-retry",
        f"| after one 503 with `Retry-After: 2` on an expired account | |\n"
        f"| --- | --- |\n"
        f"| timed retry (`backoff_max` 5 min, `backoff_max_expired` 30 s) | "
        f"within 15–30 s (was 150–300 s) |\n"
        f"| `GET …/token` {down:g} s after the 503 | 200 with a fresh token, "
        f"{len(intuit.refreshes())} calls to Intuit in all |\n",
    )


async def test_readers_of_a_dead_token_start_one_attempt_per_backoff_initial(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start(backoff_initial="5s", backoff_max="5m")
    intuit.sim.inject("503", 3)  # no Retry-After: only the spacing holds readers back
    await imported(running, intuit, "acme", expires_in=-60)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)
    began = clock.now()

    async def readers(count: int) -> set[int]:
        answers = await asyncio.gather(
            *(running.api("GET", "/v1/accounts/acme/token") for _ in range(count))
        )
        await settle(running, clock)
        return {status for status, _ in answers}

    assert await readers(10) == {503}  # 0 s since the last attempt: none starts
    assert len(intuit.refreshes()) == 1
    for _ in range(2):
        await advance(running, clock, 5)
        assert await readers(10) == {503}  # one attempt, shared by all ten; Intuit says 503
        assert await readers(10) == {503}  # and none more until 5 s have passed again
    await advance(running, clock, 5)
    assert await readers(10) == {200}
    calls = intuit.refreshes()
    assert [c.status for c in calls] == [503, 503, 503, 200]
    assert [(c.at - began).total_seconds() for c in calls] == [0, 5, 10, 15]
    write_figure(
        "dead-token-readers",
        f"| readers polling a dead token in waves of 10 while Intuit answers 503 | |\n"
        f"| --- | --- |\n"
        f"| calls to Intuit over {(calls[-1].at - began).total_seconds():g} s "
        f"(`backoff_initial` 5 s) | {len(calls)}, "
        f"at {', '.join(f'{(c.at - began).total_seconds():g}' for c in calls)} s |\n",
    )


async def test_invalid_grant_marks_needs_reconnect_and_stops(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start()
    due = await connected(running, clock, "acme")
    [exchange] = [e for e in intuit.sim.request_log if e.grant_type == "authorization_code"]
    assert exchange.issued_refresh_token is not None
    intuit.sim.invalidate(exchange.issued_refresh_token)  # the user disconnected in QuickBooks

    await advance_to(running, clock, due)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)
    [call] = intuit.refreshes()
    assert (call.status, call.error) == (400, "invalid_grant")
    body = await account(running, "acme")
    assert body["status"] == "needs_reconnect"
    assert body["next_refresh_at"] is None
    assert row(running, "acme")["status"] == "needs_reconnect"
    [line] = logs.lines("account.reconnect_needed", account_id="acme")
    assert line["level"] == "error"
    assert line["intuit_tid"] == call.intuit_tid
    assert logs.lines("refresh.retry_scheduled") == []

    for _ in range(6):
        await advance(running, clock, 30 * 60)
    status, answer = await running.api("GET", "/v1/accounts/acme/token")
    assert (status, answer["error"]) == (409, "needs_reconnect")
    status, answer = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 409
    assert len(intuit.refreshes()) == 1


async def test_invalid_client_pauses_all_refreshes_marks_no_account_and_recovers(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start(invalid_client_retry="2m")
    assert await running.connect("first") == 200
    await advance(running, clock, 20 * 60)
    assert await running.connect("second") == 200
    await settle(running, clock)
    first_due = at(await account(running, "first"), "reconnect_token_at")
    second_due = at(await account(running, "second"), "reconnect_token_at")
    assert second_due - first_due == timedelta(minutes=20)
    intuit.settings.update(client_secret="rotated-at-intuit")  # our secret is now wrong

    await advance_to(running, clock, first_due)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)
    assert intuit.refreshes()[-1].status == 401
    status, ready = await running.api("GET", "/readyz")
    assert status == 503
    assert "invalid_client" in ready["checks"]["intuit_credentials"]
    [line] = logs.lines("intuit.client_refused")
    assert line["level"] == "error"
    for account_id in ("first", "second"):
        body = await account(running, account_id)
        assert (body["status"], body["failure_count"]) == ("active", 0)
    assert logs.lines("account.reconnect_needed") == []
    [attempt] = attempts(running.database, "first")
    assert attempt.outcome == "invalid_client"

    # Paused: askers are served the still valid token and do not call Intuit.
    answers = await asyncio.gather(
        *(running.api("GET", "/v1/accounts/first/token") for _ in range(20))
    )
    assert {status for status, _ in answers} == {200}
    status, answer = await running.api("POST", "/v1/accounts/first/refresh")
    assert (status, answer["error"]) == (503, "invalid_client")
    await settle(running, clock)
    assert len(intuit.refreshes()) == 1

    # One probe per invalid_client_retry, not before.
    await advance(running, clock, 119)
    assert len(intuit.refreshes()) == 1
    await advance(running, clock, 1)
    await wait_for(lambda: len(intuit.refreshes()) == 2)
    await settle(running, clock)
    assert intuit.refreshes()[-1].status == 401

    # The paused account goes away; the pause ends while nothing else is due yet.
    status, _ = await running.api("DELETE", "/v1/accounts/first")
    assert status == 200
    await advance(running, clock, 120)  # settles: the dispatcher sleeps, it does not spin
    assert clock.next_wake() == pytest.approx(30.0)
    assert len(intuit.refreshes()) == 2

    intuit.settings.update(client_secret=SimulatorSettings().client_secret)
    await advance_to(running, clock, second_due - timedelta(seconds=1))
    assert len(intuit.refreshes()) == 2
    await advance(running, clock, 1)
    await wait_for(lambda: len(intuit.refreshes()) == 3)
    await settle(running, clock)
    call = intuit.refreshes()[-1]
    assert (call.status, call.at) == (200, second_due)
    status, ready = await running.api("GET", "/readyz")
    assert status == 200, ready
    assert logs.lines("intuit.credentials_accepted")
    assert (await account(running, "second"))["status"] == "active"


async def test_invalid_client_probe_success_resumes_every_due_account(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start(invalid_client_retry="5m")
    for account_id in ("a", "b", "c"):
        assert await running.connect(account_id) == 200
    await settle(running, clock)
    due = at(await account(running, "a"), "reconnect_token_at")
    intuit.settings.update(client_secret="rotated-at-intuit")
    await advance_to(running, clock, due)
    await wait_for(lambda: len(intuit.refreshes()) == 3)  # all three were due together
    await settle(running, clock)
    intuit.settings.update(client_secret=SimulatorSettings().client_secret)

    await advance(running, clock, 5 * 60)
    await wait_for(lambda: len(intuit.refreshes()) == 6)
    await settle(running, clock)
    assert [c.status for c in intuit.refreshes()] == [401] * 3 + [200] * 3
    assert all(c.at == due + timedelta(minutes=5) for c in intuit.refreshes()[3:])


async def test_a_probe_that_fails_on_the_database_does_not_wedge_the_pause(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start(invalid_client_retry="2m")
    due = await connected(running, clock, "acme")
    intuit.settings.update(client_secret="rotated-at-intuit")
    await advance_to(running, clock, due)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)
    assert not running.services.scheduler.credentials_ok

    # The probe is refused again, and noting the attempt fails: the database refuses writes.
    storage = running.services.storage
    assert isinstance(storage, Storage)
    writer = storage._db._writer
    await writer.execute("PRAGMA query_only = ON")
    await advance(running, clock, 120)
    await wait_for(lambda: len(intuit.refreshes()) == 2)
    await settle(running, clock)
    await writer.execute("PRAGMA query_only = OFF")

    # Credentials fixed: the next probe goes out on time and refreshes resume.
    intuit.settings.update(client_secret=SimulatorSettings().client_secret)
    await advance(running, clock, 120)
    await wait_for(lambda: len(intuit.refreshes()) == 3)
    await settle(running, clock)
    assert intuit.refreshes()[-1].status == 200
    assert running.services.scheduler.credentials_ok


async def test_a_probe_answered_by_an_outage_keeps_the_pause(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start(invalid_client_retry="2m")
    due = await connected(running, clock, "acme")
    intuit.sim.inject("invalid_client")
    await advance_to(running, clock, due)
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)

    # Intuit's 502 page says nothing about our credentials: still paused.
    intuit.sim.inject("502_html")
    await advance(running, clock, 120)
    await wait_for(lambda: len(intuit.refreshes()) == 2)
    await settle(running, clock)
    assert not running.services.scheduler.credentials_ok
    status, _ = await running.api("GET", "/readyz")
    assert status == 503


# -- limits and single flight --------------------------------------------------------------


async def test_the_concurrency_cap_holds_for_timers_and_api_askers(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start(concurrency=3)
    names = [f"tenant-{n}" for n in range(9)]
    for name in names:
        await imported(running, intuit, name, expires_in=1200)
    await settle(running, clock)
    intuit.settings.update(latency=0.2)

    await advance(running, clock, 600)  # all nine are due now
    await wait_for(lambda: len(intuit.refreshes()) == 9)
    await settle(running, clock)
    assert intuit.gauge.peak == 3  # reached, never passed
    for name in names:
        assert (await account(running, name))["failure_count"] == 0
        assert row(running, name)["version"] == 2

    intuit.gauge.peak = 0
    answers = await asyncio.gather(
        *(running.api("POST", f"/v1/accounts/{name}/refresh") for name in names)
    )
    assert {status for status, _ in answers} == {200}
    assert len(intuit.refreshes()) == 18
    assert intuit.gauge.peak == 3


async def test_a_hundred_askers_of_an_expired_token_cause_one_refresh(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    running = await start()
    assert await running.connect("acme") == 200
    await settle(running, clock)
    # The wall clock leaps past expiry; the dispatcher sleeps on, so the askers come first.
    clock.jump_wall(timedelta(hours=2))
    await settle(running, clock)
    assert intuit.refreshes() == []

    answers = await asyncio.gather(
        *(running.api("GET", "/v1/accounts/acme/token") for _ in range(100))
    )
    assert {status for status, _ in answers} == {200}
    tokens = {body["access_token"] for _, body in answers}
    assert len(tokens) == 1
    assert len(intuit.refreshes()) == 1
    assert intuit.sim.is_access_token_valid(tokens.pop())
    assert {body["expires_at"] for _, body in answers} == {iso(clock.now() + timedelta(hours=1))}
    await settle(running, clock)
    assert len(intuit.refreshes()) == 1


async def test_rotation_never_presents_a_refresh_token_older_than_the_newest(
    start: Start, intuit: Intuit, clock: ManualClock
) -> None:
    intuit.settings.update(rotate_after=0)  # every refresh answers a new refresh token
    running = await start()
    assert await running.connect("acme") == 200
    for _ in range(4):
        asks = [running.api("POST", "/v1/accounts/acme/refresh") for _ in range(15)]
        asks += [running.api("GET", "/v1/accounts/acme/token") for _ in range(15)]
        answers = await asyncio.gather(*asks)
        assert {status for status, _ in answers} == {200}
        await advance(running, clock, 65 * 60)  # the token expires; the timer refreshes too
    await settle(running, clock)

    token_calls = [e for e in intuit.sim.request_log if e.endpoint == "token"]
    assert token_calls[0].grant_type == "authorization_code"
    newest = token_calls[0].issued_refresh_token
    for call in token_calls[1:]:
        assert call.status == 200, call.error
        assert call.presented_refresh_token == newest  # never an older one
        newest = call.issued_refresh_token
    assert len(token_calls) >= 9  # at least one API refresh and one timer refresh per round
    stored = await running.services.storage.load("acme")
    assert stored.refresh_token == newest
    assert stored.status.value == "active"


# -- start-up, hard expiry, shutdown -------------------------------------------------------


async def test_catch_up_after_downtime_most_overdue_first_through_the_limit(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start(concurrency=3)
    rank: dict[str, int] = {}  # refresh token -> how overdue (0 = most)
    for n in range(8):
        token = await imported(running, intuit, f"tenant-{n}", expires_in=3600 - 120 * n)
        rank[token] = 7 - n
    dead = await imported(
        running,
        intuit,
        "dead",
        expires_in=3600,
        refresh_token_expires_at=iso(T0 + timedelta(hours=1)),
    )
    await stop_daemon(running)

    clock.advance(2 * 3600)  # two hours of downtime: every access token died
    intuit.settings.update(latency=0.1)
    running = await start(concurrency=3)
    await wait_for(lambda: len(intuit.refreshes()) == 8)
    await settle(running, clock)

    [started] = logs.lines("scheduler.started")[-1:]
    assert started["overdue"] == 9
    assert intuit.gauge.peak == 3
    assert dead not in intuit.gauge.arrivals  # its refresh token had died: not even tried
    order = [rank[token] for token in intuit.gauge.arrivals if token is not None]
    assert sorted(order) == list(range(8))
    # Dispatched in due order; requests sent together may overtake each other.
    assert all(abs(position - r) < 3 for position, r in enumerate(order)), order
    for n in range(8):
        body = await account(running, f"tenant-{n}")
        assert body["status"] == "active"
        assert at(body, "token_expires_at") == clock.now() + timedelta(hours=1)
    body = await account(running, "dead")
    assert body["status"] == "needs_reconnect"
    assert [line["account_id"] for line in logs.lines("account.reconnect_needed")] == ["dead"]


async def test_hard_expiry_is_warned_ahead_and_ends_in_needs_reconnect_without_a_call(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    intuit.settings.update(hard_expires_in=3 * 3600)  # Intuit's 5-year limit, shortened
    running = await start(hard_expiry_warning="1h")
    calls = 0
    # The second connection (a reconnect) has a hard expiry of its own, warned again.
    for warnings in (1, 2):
        assert await running.connect("acme") == 200
        await settle(running, clock)
        connected = clock.now()
        hard = connected + timedelta(hours=3)
        body = await account(running, "acme")
        assert at(body, "refresh_token_hard_expires_at") == hard
        assert body["hard_expiry_soon"] is False

        # Refreshes at 0:50 and 1:40 leave more than an hour; the one at 2:30 does not.
        for _ in range(3):
            assert len(logs.lines("account.hard_expiry_approached")) == warnings - 1
            due = at(await account(running, "acme"), "reconnect_token_at")
            await advance_to(running, clock, due)
            calls += 1
            await wait_for(lambda n=calls: len(intuit.refreshes()) == n)
            await settle(running, clock)
        assert clock.now() == connected + timedelta(hours=2, minutes=30)
        warning = logs.lines("account.hard_expiry_approached", account_id="acme")[-1]
        assert len(logs.lines("account.hard_expiry_approached")) == warnings
        assert warning["level"] == "warning"
        assert warning["hard_expires_at"] == iso(hard)
        assert (await account(running, "acme"))["hard_expiry_soon"] is True

        await advance(running, clock, 3600)
        body = await account(running, "acme")
        assert body["status"] == "needs_reconnect"
        assert len(intuit.refreshes()) == calls  # no call with a dead refresh token
        assert len(logs.lines("account.hard_expiry_approached")) == warnings
        assert len(logs.lines("account.reconnect_needed", account_id="acme")) == warnings


async def test_shutdown_lets_an_in_flight_refresh_finish_and_persist(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start()
    due = await connected(running, clock, "acme")
    intuit.settings.update(latency=1.0)

    clock.advance((due - clock.now()).total_seconds())
    await wait_for(lambda: intuit.gauge.in_flight == 1)  # Intuit is answering
    await stop_daemon(running)

    [call] = intuit.refreshes()
    assert call.status == 200
    assert logs.lines("scheduler.drain_started", in_flight=1)
    assert logs.lines("scheduler.refreshes_cancelled") == []
    stored = row(running, "acme")
    assert (stored["version"], stored["last_refreshed_at"]) == (2, iso(due))
    assert stored["token_expires_at"] == iso(due + timedelta(hours=1))

    intuit.settings.update(latency=0.0)
    again = await start()
    status, token = await again.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    assert intuit.sim.is_access_token_valid(token["access_token"])
    assert token["expires_at"] == iso(due + timedelta(hours=1))
    assert len(intuit.refreshes()) == 1


async def test_shutdown_does_not_wait_past_its_grace_for_a_hung_refresh(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs
) -> None:
    running = await start(concurrency=1, shutdown_grace="1s")
    for account_id in ("a", "b"):
        await imported(running, intuit, account_id, expires_in=1200)
    await settle(running, clock)
    intuit.sim.inject("hang")  # Intuit holds the call until our 10 s timeout

    clock.advance(600)  # both due; one Intuit slot: the second waits behind the hung call
    await wait_for(lambda: intuit.gauge.in_flight == 1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await stop_daemon(running)
    assert loop.time() - began < 8.0  # the 1 s grace, not the 10 s Intuit timeout
    # Both were cancelled: the hung call and the one waiting for its Intuit slot.
    assert logs.lines("scheduler.refreshes_cancelled", cancelled=2)
    assert len(intuit.refreshes()) == 1


@pytest.mark.parametrize("answer", ["success", "invalid_grant"])
async def test_a_reconnect_during_a_refresh_wins_and_keeps_its_timer(
    start: Start, intuit: Intuit, clock: ManualClock, logs: Logs, answer: str
) -> None:
    running = await start()
    assert await running.connect("acme") == 200
    await settle(running, clock)
    old = await running.services.storage.load("acme")
    assert old.refresh_token is not None
    assert old.reconnect_token_at is not None
    if answer == "invalid_grant":
        intuit.sim.invalidate(old.refresh_token)
    # The code must outlive the clock's jump to the timer (codes live 10 minutes).
    intuit.settings.update(latency=1.0, code_lifetime=7200)
    await advance(running, clock, 30 * 60)  # the new connection is due well after the old

    # The user reconnects; while Intuit exchanges the code, the old timer fires.
    reconnect = asyncio.create_task(running.connect("acme"))
    await wait_for(lambda: intuit.gauge.in_flight == 1)
    # The refresh answers a second after the exchange: the reconnect (its realm check
    # included) is stored while the refresh is still in flight, however busy the machine.
    intuit.settings.update(latency=2.0)
    clock.advance((old.reconnect_token_at - clock.now()).total_seconds())
    await wait_for(lambda: intuit.gauge.in_flight == 2)
    assert await asyncio.wait_for(reconnect, 30) == 200
    await wait_for(lambda: len(intuit.refreshes()) == 1)
    await settle(running, clock)

    [call] = intuit.refreshes()
    assert call.presented_refresh_token == old.refresh_token
    assert call.status == (200 if answer == "success" else 400)
    new = await running.services.storage.load("acme")
    exchange = [e for e in intuit.sim.request_log if e.grant_type == "authorization_code"][-1]
    assert new.refresh_token == exchange.issued_refresh_token  # the new connection's
    assert new.status.value == "active"
    assert new.reconnect_token_at == exchange.at + timedelta(minutes=50)
    assert await next_refresh(running.services, "acme") == new.reconnect_token_at
    assert logs.lines("account.reconnect_needed") == []
    # The old token's answer was set aside, and said so: a race, not a dead connection.
    [discarded] = logs.lines("refresh.discarded", account_id="acme")
    assert (discarded["answer"], discarded["intuit_tid"]) == (answer, call.intuit_tid)
    assert (new.failure_count, new.last_error) == (0, None)
