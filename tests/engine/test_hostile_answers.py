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
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbo_daemon.core.models import Account, AccountStatus, iso
from qbo_daemon.engine.outcome import OutcomeKind
from qbo_daemon.engine.refresher import Refresher
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.engine.state import AccountStates
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator, RequestLogEntry, SimulatorSettings
from tests.engine.test_scheduler import Logs, advance, advance_to, settle
from tests.figures import write_figure
from tests.harness import RunningDaemon, next_refresh, start_daemon, wait_for
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
    escapes: Escapes

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
        return await self.daemon.services.storage.load(account_id)

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
    yield World(clock, sim, running, logs, escapes)
    await asyncio.wait_for(running.shutdown(), 30)
    await sim.close()


async def assert_live_or_terminal(world: World, account_id: str, status: AccountStatus) -> None:
    """Invariant 2: a refresh due within the longest wait, or a terminal status."""
    if status in TERMINAL:
        return
    due = await next_refresh(world.daemon.services, account_id)
    assert due is not None, f"{account_id} ({status}) has no timer"
    assert due <= world.clock.now() + LONGEST_WAIT, (account_id, iso(due))


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
    due = await next_refresh(world.daemon.services, "acme")
    assert due is not None
    await world.answer(503, "<html>busy</html>", [("Retry-After", header)])

    await advance_to(world.daemon, world.clock, due)
    await wait_for(lambda: len(world.token_calls()) == 1)
    await settle(world.daemon, world.clock)
    retry_at = world.scheduler.due_at("acme")
    assert retry_at is not None, "the account's timer vanished"
    assert timedelta(0) < retry_at - world.clock.now() <= timedelta(seconds=BACKOFF_MAX)
    [line] = world.logs.lines("refresh.retry_scheduled", account_id="acme")
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
    await assert_live_or_terminal(world, account.account_id, account.status)
    assert not escapes, escapes


async def test_unprintable_words_in_an_error_answer_are_recorded_readably(
    world: World, escapes: Escapes
) -> None:
    await world.imported("acme")
    due = await next_refresh(world.daemon.services, "acme")
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
    [attempt] = await world.daemon.services.status.attempts("acme")
    assert (attempt.outcome, attempt.intuit_tid) == ("transient", None)
    await assert_live_or_terminal(world, account.account_id, account.status)
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
    # The daemon's own storage, client and policy, under a scheduler whose events fail.
    states = AccountStates()
    refresher = Refresher(
        services.storage,
        services.intuit,
        world.clock,
        services.metrics,
        services.policy,
        states,
        concurrency=1,
    )
    scheduler = Scheduler(
        refresher,
        services.storage,
        world.clock,
        services.metrics,
        BrokenEvents(),
        services.policy,
        states,
        concurrency=1,
    )
    await world.answer(500, '{"error": "server_error"}')
    failed = await scheduler.refresh_now("acme")
    assert failed.kind is OutcomeKind.TRANSIENT

    # The success after a failure emits account.recovered, which raises.
    recovered = await scheduler.refresh_now("acme")
    assert recovered.kind is OutcomeKind.SUCCESS
    assert scheduler.due_at("acme") == world.clock.now() + timedelta(seconds=BACKOFF_MAX)
    [line] = world.logs.lines("refresh.reschedule_failed")
    assert (line["level"], line["account_id"], line["error"]) == ("error", "acme", "RuntimeError")
    text = world.logs.stream.getvalue()
    assert grant["refresh_token"] not in text
    assert grant["access_token"] not in text
    assert not escapes, escapes


# -- any answer at all (hypothesis) ------------------------------------------------------------

# Examples per run in the default suite: each is one new account and 1-3 answers. The
# draw is derandomized, so the figure in docs/reliability.md changes only with the code.
EXAMPLES = 60
# In an answer's fields: the refresh token of a live connection, minted when delivered.
ROTATED = "<rotated>"
# A token as Intuit issues them: one word of printable ASCII (the daemon's contract).
WORD = re.compile(r"[\x21-\x7e]+")
EXAMPLE_TASK = "hostile-example"


def is_word(literal: str) -> bool:
    value = json.loads(literal)
    return isinstance(value, str) and WORD.fullmatch(value) is not None


@dataclass(frozen=True)
class Answer:
    """One answer of the token endpoint: a token body (``fields``) or any bytes (``raw``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, str], ...] | None  # (name, JSON text); ROTATED for the live token
    raw: bytes = b""

    def body(self, rotated: str) -> bytes:
        if self.fields is None:
            return self.raw
        items = (
            f"{json.dumps(name)}: {json.dumps(rotated) if value == ROTATED else value}"
            for name, value in self.fields
        )
        return ("{" + ", ".join(items) + "}").encode()

    @property
    def needs_rotated(self) -> bool:
        return self.fields is not None and (("refresh_token", ROTATED) in self.fields)

    def committed_refresh_token(self, rotated: str) -> str | None:
        """The refresh token a daemon must commit from this answer, if any (invariant 1)."""
        if self.status != 200 or self.fields is None:
            return None
        given = dict(self.fields)
        access = given.get("access_token")
        refresh = given.get("refresh_token")
        if access is None or not is_word(access) or refresh is None:
            return None
        if refresh == ROTATED:
            return rotated
        return str(json.loads(refresh)) if is_word(refresh) else None

    @property
    def kind(self) -> str:
        if self.status == 200:
            return "200 token body" if self.fields is not None else "200 other body"
        return f"{self.status // 100}xx" if self.status < 600 else "600-999"


# JSON text for a lifetime: sane, huge, fractional, non-finite, Unicode digits, any type.
lifetimes = st.one_of(
    st.integers(-10, 10**7).map(str),
    st.integers(10**7, 10**40).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.floats().map(lambda f: json.dumps(f)),
    st.sampled_from(
        [
            '"\\u00b2"',
            '"\\u0661\\u0662"',
            '"\\uff13\\uff16\\uff10\\uff10"',
            '"3600"',
            '" 3600 "',
            '"1e3"',
            '""',
            "true",
            "null",
            "[3600]",
            "{}",
            f'"{"9" * 5000}"',
        ]
    ),
    st.text(max_size=12).map(json.dumps),
)
# JSON text for a token: sound words, and what no token can be.
sound_tokens = st.from_regex(r"[\x21-\x7e]{1,48}", fullmatch=True).map(json.dumps)
hostile_tokens = st.one_of(
    st.text(max_size=12).map(json.dumps),
    st.sampled_from(['""', "null", "42", "true", "[]", '"a b"', '"\\ud800"', '"t\\u0000"']),
)


@st.composite
def token_fields(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    fields: dict[str, str] = {}
    # Mostly sound pairs (a sound access token, the rotated refresh token), so that
    # many answers put invariant 1 to the test.
    shape = draw(st.sampled_from(["pair"] * 6 + ["bad access", "bad refresh", "other word"]))
    access = draw(hostile_tokens | st.none() if shape == "bad access" else sound_tokens)
    if access is not None:
        fields["access_token"] = access
    refresh: str | None = ROTATED
    if shape == "bad refresh":
        refresh = draw(hostile_tokens | st.none())
    elif shape == "other word":
        refresh = draw(sound_tokens)
    if refresh is not None:
        fields["refresh_token"] = refresh
    for name in ("expires_in", "x_refresh_token_expires_in", "x_refresh_token_hard_expires_in"):
        value = draw(st.none() | lifetimes)
        if value is not None:
            fields[name] = value
    if draw(st.booleans()):
        fields["token_type"] = draw(st.sampled_from(['"bearer"', '"mac"', "7"]))
    return tuple(fields.items())


retry_after = st.one_of(
    st.integers(0, 10**30).map(str),
    st.floats(min_value=-1e20, max_value=1e20).map(repr),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
        lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT")
    ),
    st.sampled_from(["1e12", "-3", "nan", "inf", "\u00b2", "0x10", " 5 ", "9" * 4000]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)
header_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(["\t", "\x7f"]),
    max_size=40,
)
headers = st.lists(
    st.one_of(
        st.tuples(st.just("Retry-After"), retry_after),
        st.tuples(st.just("intuit_tid"), header_text),
        st.tuples(
            st.just("Content-Type"),
            st.sampled_from(["application/json", "text/html", "text/plain; charset=utf-16"]),
        ),
        st.tuples(st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True), header_text),
    ),
    max_size=4,
).map(tuple)
error_bodies = st.one_of(
    st.builds(
        lambda code, text: json.dumps({"error": code, "error_description": text}),
        st.sampled_from(
            ["invalid_grant", "invalid_client", "unauthorized_client", "invalid_request"]
        )
        | st.text(max_size=20),
        st.text(max_size=40),
    ).map(str.encode),
    st.just(b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    st.just(b"[" * 100_000),
    st.binary(max_size=200),
)
statuses = st.sampled_from([400, 401, 403, 404, 429, 500, 502, 503, 504]) | st.integers(200, 999)
answers = st.one_of(
    st.builds(Answer, st.just(200), headers, token_fields()),
    st.builds(Answer, statuses, headers, st.none() | token_fields(), error_bodies),
)


@dataclass
class Tally:
    examples: int = 0
    delivered: int = 0
    committed: int = 0
    undelivered: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


async def push(world: World, account_id: str, sequence: list[Answer], tally: Tally) -> None:
    """Deliver ``sequence`` to ``account_id`` through POST …/refresh; check after each."""
    asyncio.current_task().set_name(EXAMPLE_TASK)  # type: ignore[union-attr]
    await world.imported(account_id)
    await settle(world.daemon, world.clock)
    tally.examples += 1
    for answer in sequence:  # the daemon is quiet: nothing is due, nothing in flight
        before = await world.stored(account_id)
        rotated = world.sim.grant()["refresh_token"] if answer.needs_rotated else ""
        calls = len(world.token_calls())
        await world.answer(answer.status, answer.body(rotated), list(answer.headers))
        status, body = await world.daemon.api("POST", f"/v1/accounts/{account_id}/refresh")
        assert status in (200, 409, 503), (status, body)
        await settle(world.daemon, world.clock)
        delivered = world.token_calls()[calls:]
        if not delivered:
            # Not asked: the account is terminal, or invalid_client paused refreshes.
            tally.undelivered += 1
            break
        assert delivered[0].fault == "raw"
        assert delivered[0].presented_refresh_token == before.refresh_token
        tally.delivered += 1
        tally.kinds[answer.kind] += 1
        after = await world.stored(account_id)
        carried = answer.committed_refresh_token(rotated)
        # Invariant 1: a 200 carrying a token pair is committed; nothing else moves the token.
        if carried is not None:
            assert status == 200, body
            assert after.refresh_token == carried
            assert after.access_token == json.loads(dict(answer.fields or ())["access_token"])
            tally.committed += 1
        else:
            assert after.refresh_token == before.refresh_token
    async with world.daemon.session.post(f"{world.sim.base_url}/_sim/reset") as reset:
        assert reset.status == 200
    if not world.scheduler.credentials_ok:
        world.scheduler.resume()  # as a reload would; the next refresh probes
    await settle(world.daemon, world.clock)
    # Invariant 2, over every account so far.
    status, listing = await world.daemon.api("GET", "/v1/accounts")
    assert status == 200, listing
    for shown in listing["accounts"]:
        await assert_live_or_terminal(world, shown["account_id"], AccountStatus(shown["status"]))
    # Invariant 3.
    assert world.scheduler.running
    assert_no_escapes(world.escapes)


def assert_no_escapes(escapes: Escapes) -> None:
    tasks = [t for t in escapes.tasks if not t.startswith(f"{EXAMPLE_TASK}:")]
    assert not tasks, tasks
    assert not escapes.loop_errors, escapes.loop_errors


async def test_no_answer_loses_a_token_a_timer_or_a_task(world: World) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally()
    names = itertools.count()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(sequence=st.lists(answers, min_size=1, max_size=3))
    def example(sequence: list[Answer]) -> None:
        # Hypothesis runs in a worker thread; the daemon runs on, on the event loop.
        account_id = f"hostile-{next(names)}"
        push_it = push(world, account_id, sequence, tally)
        asyncio.run_coroutine_threadsafe(push_it, loop).result(timeout=120)

    await asyncio.to_thread(example)

    # When time moves, every account is refreshed again or has a terminal status.
    moved_from = world.clock.now()
    await advance(world.daemon, world.clock, LONGEST_WAIT.total_seconds() + 1)
    for _ in range(3):  # retries and a probe after an invalid_client pause
        await advance(world.daemon, world.clock, BACKOFF_MAX)
    status, listing = await world.daemon.api("GET", "/v1/accounts")
    assert status == 200, listing
    refreshed = terminal = 0
    for shown in listing["accounts"]:
        account = await world.stored(shown["account_id"])
        if account.status in TERMINAL:
            terminal += 1
            continue
        assert account.status is AccountStatus.ACTIVE, shown
        assert account.last_refreshed_at is not None
        assert account.last_refreshed_at >= moved_from, shown
        refreshed += 1
    assert refreshed + terminal == tally.examples
    assert tally.committed > 0
    assert_no_escapes(world.escapes)

    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(tally.kinds.items()))
    write_figure(
        "hostile-answers",
        f"""\
| examples (accounts) | answers delivered | token pairs committed | answers by kind |
| --- | --- | --- | --- |
| {tally.examples} | {tally.delivered} | {tally.committed} | {kinds} |

After every answer: the committed refresh token was the one carried, or the
old one was kept. After every example: every account had a live timer or a
terminal status, no task had ended with an exception. Then the clock moved
an hour: {refreshed} accounts were refreshed again, {terminal} were terminal
(`needs_reconnect`: an answer said `invalid_grant`, the stored refresh token
was one the simulator never issued, or a hostile lifetime had expired it),
0 were left behind.""",
    )
