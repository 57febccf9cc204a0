"""Webhook delivery against a real aiohttp receiver on 127.0.0.1 that checks signatures."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import re
import socket
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from structlog.typing import EventDict

from qbo_daemon.core.clock import SystemClock
from qbo_daemon.core.models import AccountStatus, Secret
from qbo_daemon.runtime import webhooks
from qbo_daemon.runtime.webhooks import WebhookNotifier
from tests.manual_clock import ManualClock

SECRET = "whsec-test-0123456789"
START = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)

Verify = Callable[[bytes, str, bytes], bool]


def documented_verify() -> Verify:
    """The receiver check exactly as the module docstring shows it, so the docs stay true."""
    doc = webhooks.__doc__ or ""
    match = re.search(r"bounds replays::\n\n(.*)", doc, re.DOTALL)
    assert match, "the module docstring lost its verify example"
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(match.group(1)), namespace)  # noqa: S102 - our own docstring
    verify: Verify = namespace["verify"]
    return verify


def hmac_ok(header: str, body: bytes) -> tuple[bool, int]:
    """An independent check (no clock tolerance, for the manual clock): valid?, t."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    t = fields["t"]
    expected = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]), int(t)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.body)
        return payload


@dataclass
class Receiver:
    """The host app's webhook endpoint. ``answers`` scripts each request in turn."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # "ok", "fail", "hang"
    delivered: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(dict(request.headers), body))
        answer = self.answers.pop(0) if self.answers else "ok"
        if answer == "hang":
            await asyncio.sleep(3600)
        if answer == "fail":
            return web.Response(status=503, text="<html>nginx: bad gateway</html>")
        self.delivered.set()
        return web.json_response({"received": True})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/qbo", state.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/hooks/qbo"
    yield state
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def named(logs: list[EventDict], event: str) -> list[EventDict]:
    return [entry for entry in logs if entry["event"] == event]


async def drive(clock: ManualClock, done: Callable[[], bool]) -> None:
    """Let real I/O run and fast-forward every backoff sleep until ``done``."""
    async with asyncio.timeout(10):
        while not done():
            await asyncio.sleep(0.01)
            wake = clock.next_wake()
            if wake is not None:
                clock.advance(wake)


async def test_delivers_a_signed_event(
    receiver: Receiver, session: aiohttp.ClientSession, logs: list[EventDict]
) -> None:
    notifier = WebhookNotifier(session, receiver.url, Secret(SECRET), clock=SystemClock())
    assert notifier.enabled
    notifier.emit(
        "account.connected",
        "acme",
        realm_id="9130",
        status=AccountStatus.ACTIVE,
        token_expires_at=None,  # refused: the name says token, whatever the value
        connected_at=START,
    )
    await asyncio.wait_for(receiver.delivered.wait(), 5)
    await notifier.aclose(5)

    [request] = receiver.requests
    verify = documented_verify()
    assert verify(SECRET.encode(), request.headers["Qbo-Daemon-Signature"], request.body)
    assert not verify(b"wrong", request.headers["Qbo-Daemon-Signature"], request.body)
    assert not verify(SECRET.encode(), request.headers["Qbo-Daemon-Signature"], request.body + b" ")
    assert request.headers["Qbo-Daemon-Event"] == "account.connected"
    assert request.headers["Content-Type"] == "application/json"
    payload = request.json
    assert set(payload) == {"id", "event", "account_id", "occurred_at", "data"}
    assert uuid.UUID(payload["id"]).version == 4
    assert request.headers["Qbo-Daemon-Delivery"] == payload["id"]
    assert payload["event"] == "account.connected"
    assert payload["account_id"] == "acme"
    occurred = datetime.fromisoformat(payload["occurred_at"])
    assert payload["occurred_at"].endswith("Z")
    assert occurred.utcoffset() == UTC.utcoffset(None)
    assert payload["data"] == {
        "realm_id": "9130",
        "status": "active",
        "connected_at": "2025-01-31T12:00:00.000000Z",
    }
    [event_log] = named(logs, "account.connected")
    assert event_log["account_id"] == "acme"
    assert event_log["log_level"] == "info"
    assert "token_expires_at" not in event_log


async def test_retries_after_failures_then_delivers_once(
    receiver: Receiver, session: aiohttp.ClientSession, logs: list[EventDict]
) -> None:
    receiver.answers = ["fail", "hang", "ok"]
    clock = ManualClock(START)
    notifier = WebhookNotifier(
        session,
        receiver.url,
        Secret(SECRET),
        clock=clock,
        timeout=0.3,
        backoff_initial=2.0,
        rng=random.Random(7),
    )
    notifier.emit("account.reconnect_needed", "acme", error="invalid_grant")
    await drive(clock, receiver.delivered.is_set)
    await notifier.aclose(5)

    assert len(receiver.requests) == 3
    ids = {request.json["id"] for request in receiver.requests}
    assert len(ids) == 1, "every retry carries the same id, for the receiver to deduplicate"
    timestamps = []
    for request in receiver.requests:
        valid, t = hmac_ok(request.headers["Qbo-Daemon-Signature"], request.body)
        assert valid
        timestamps.append(t)
    # Signed anew on each attempt, with the injected clock's time.
    assert timestamps[0] == int(START.timestamp())
    assert timestamps == sorted(timestamps)
    retries = named(logs, "webhook.retry_scheduled")
    assert [entry["error"] for entry in retries] == ["HTTP 503", "TimeoutError"]
    assert retries[0]["retry_in"] <= 2.0
    assert retries[1]["retry_in"] <= 4.0
    assert not named(logs, "webhook.delivery_abandoned")
    [event_log] = named(logs, "account.reconnect_needed")
    assert event_log["log_level"] == "error", "a connection the user must redo is an error"
    assert event_log["error"] == "invalid_grant"


async def test_gives_up_after_max_attempts(
    session: aiohttp.ClientSession, logs: list[EventDict]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = ManualClock(START)
    notifier = WebhookNotifier(
        session,
        f"http://127.0.0.1:{port}/hooks",
        Secret(SECRET),
        clock=clock,
        max_attempts=4,
        backoff_initial=10.0,
        backoff_max=15.0,
        rng=random.Random(1),
    )
    notifier.emit("account.disconnected", "acme")
    await drive(clock, lambda: bool(named(logs, "webhook.delivery_abandoned")))
    await notifier.aclose(1)

    retries = named(logs, "webhook.retry_scheduled")
    assert [entry["attempt"] for entry in retries] == [1, 2, 3]
    assert all(entry["error"] == "ClientConnectorError" for entry in retries)
    assert all(0.0 <= entry["retry_in"] <= 15.0 for entry in retries)
    [gave_up] = named(logs, "webhook.delivery_abandoned")
    assert gave_up["attempts"] == 4
    assert gave_up["log_level"] == "warning"
    assert not named(logs, "webhook.queue_abandoned")


async def test_secret_fields_are_neither_sent_nor_logged(
    receiver: Receiver, session: aiohttp.ClientSession, logs: list[EventDict]
) -> None:
    notifier = WebhookNotifier(session, receiver.url, Secret(SECRET), clock=SystemClock())
    notifier.emit(
        "account.recovered",
        "acme",
        refresh_token="RT-LEAK-1",
        access_token="AT-LEAK-2",
        client_secret="CS-LEAK-3",
        code="CODE-LEAK-4",
        api_key="KEY-LEAK-5",
        realm=Secret("SECRET-LEAK-6"),
        failures=3,
    )
    await asyncio.wait_for(receiver.delivered.wait(), 5)
    await notifier.aclose(5)

    [request] = receiver.requests
    assert request.json["data"] == {"failures": 3}
    assert b"LEAK" not in request.body
    assert "LEAK" not in repr(logs)
    refused = {entry["field"] for entry in named(logs, "webhook.field_refused")}
    assert refused == {"refresh_token", "access_token", "client_secret", "code", "api_key", "realm"}


async def test_disabled_still_logs(logs: list[EventDict]) -> None:
    notifier = WebhookNotifier(None, None, None, clock=ManualClock(START))
    assert not notifier.enabled
    notifier.emit("account.hard_expiry_approached", "acme", days_left=30)
    notifier.emit("account.connected", "globex")
    assert notifier.pending == 0
    await asyncio.wait_for(notifier.aclose(5), 1)

    [soon] = named(logs, "account.hard_expiry_approached")
    assert soon == {
        "event": "account.hard_expiry_approached",
        "account_id": "acme",
        "days_left": 30,
        "log_level": "warning",
    }
    assert named(logs, "account.connected")[0]["account_id"] == "globex"
    assert not [entry for entry in logs if entry["event"].startswith("webhook.")]


async def test_full_queue_drops_the_oldest(
    receiver: Receiver, session: aiohttp.ClientSession, logs: list[EventDict]
) -> None:
    notifier = WebhookNotifier(
        session, receiver.url, Secret(SECRET), clock=SystemClock(), queue_size=2, concurrency=1
    )
    # No await between the emits: the worker has not run yet, so the queue fills.
    for account_id in ("first", "second", "third"):
        notifier.emit("account.connected", account_id)
    assert notifier.pending == 2
    await notifier.aclose(5)

    assert [request.json["account_id"] for request in receiver.requests] == ["second", "third"]
    [dropped] = named(logs, "webhook.oldest_dropped")
    assert dropped["account_id"] == "first"


async def test_close_is_bounded(
    receiver: Receiver, session: aiohttp.ClientSession, logs: list[EventDict]
) -> None:
    receiver.answers = ["hang"]
    notifier = WebhookNotifier(
        session, receiver.url, Secret(SECRET), clock=SystemClock(), timeout=60, concurrency=1
    )
    notifier.emit("account.connected", "acme")
    notifier.emit("account.connected", "globex")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await notifier.aclose(0.3)
    assert loop.time() - started < 2
    [undelivered] = named(logs, "webhook.queue_abandoned")
    assert undelivered["undelivered"] == 2
    notifier.emit("account.connected", "late")
    assert named(logs, "webhook.late_event_dropped")


async def test_refuses_bad_use(session: aiohttp.ClientSession) -> None:
    clock = ManualClock(START)
    with pytest.raises(ValueError, match="unknown event"):
        WebhookNotifier(None, None, None, clock=clock).emit("account.exploded", "acme")
    with pytest.raises(ValueError, match="secret"):
        WebhookNotifier(session, "http://127.0.0.1:1/", None, clock=clock)
    with pytest.raises(ValueError, match="secret"):
        WebhookNotifier(session, "http://127.0.0.1:1/", Secret(""), clock=clock)
    with pytest.raises(ValueError, match="session"):
        WebhookNotifier(None, "http://127.0.0.1:1/", Secret(SECRET), clock=clock)


def test_sign_matches_documented_verify() -> None:
    body = b'{"id":"x"}'
    header = webhooks.sign(SECRET.encode(), 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert hmac_ok(header, body) == (True, 1_700_000_000)
    # Too old for the documented 5-minute tolerance.
    assert not documented_verify()(SECRET.encode(), header, body)
