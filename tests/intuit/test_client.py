"""IntuitClient against the real simulator (and a tiny fake where the simulator cannot go).

The wire format is checked from the server's side: a hook on the simulator's own
app records every request as it arrived. Times are exact because the client
and the simulator share one hand-moved clock.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, parse_qsl

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from qbo_daemon.cli.demo import free_port
from qbo_daemon.config.load import IntuitConfig
from qbo_daemon.core.errors import (
    IntuitError,
    InvalidClientError,
    InvalidGrantError,
    TransientIntuitError,
)
from qbo_daemon.core.models import Secret
from qbo_daemon.intuit.client import HARD_EXPIRY_HEADER, IntuitClient, TokenResult
from qbo_daemon.simulator.app import FAULT_KINDS, IntuitSimulator, SimulatorSettings
from tests.manual_clock import ManualClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REDIRECT = "http://127.0.0.1:3000/accounts/oauth2_callback"
SCOPES = ("com.intuit.quickbooks.accounting", "openid")
CLIENT_ID = "sim-client-id"
CLIENT_SECRET = "sim-client-secret"
ACCESS_LIFE = 1800
REFRESH_LIFE = 5_000_000
HARD_LIFE = 150_000_000


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def form(self) -> dict[str, str]:
        assert self.headers["Content-Type"] == "application/x-www-form-urlencoded"
        return dict(parse_qsl(self.body.decode(), strict_parsing=True))


class Server:
    """A real aiohttp app on a random loopback port that records what it receives."""

    def __init__(self, app: web.Application) -> None:
        self.seen: list[Seen] = []
        app.on_response_prepare.append(self._record)
        self._runner = web.AppRunner(app, access_log=None)
        self.base_url = ""

    async def start(self) -> str:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _record(self, request: web.Request, response: web.StreamResponse) -> None:
        # Handlers read the body already; read() returns the cached bytes.
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, request.headers, body))


class FakeIntuit:
    """Answers the token and revocation endpoints with whatever a test queues."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        app = web.Application()
        app.router.add_post("/token", self._answer)
        app.router.add_post("/revoke", self._answer)
        self.server = Server(app)

    def queue(
        self, status: int, body: Any = None, *, raw: bytes | None = None, **headers: str
    ) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.answers.append((status, headers, data))

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        status, headers, body = self.answers.pop(0)
        content_type = "text/html" if body.lstrip().startswith(b"<") else "application/json"
        return web.Response(status=status, body=body, headers=headers, content_type=content_type)


def intuit_config(base: str, **changes: Any) -> IntuitConfig:
    config = IntuitConfig(
        environment="production",
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        redirect_uri=REDIRECT,
        scopes=SCOPES,
        authorization_endpoint=f"{base}/connect/oauth2",
        token_endpoint=f"{base}/oauth2/v1/tokens/bearer",
        revocation_endpoint=f"{base}/v2/oauth2/tokens/revoke",
        timeout=timedelta(seconds=10),
    )
    return replace(config, **changes)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[tuple[IntuitSimulator, Server]]:
    """The shipped simulator, served with a recording hook on its own app."""
    simulator = IntuitSimulator(
        SimulatorSettings(
            expires_in=ACCESS_LIFE, refresh_expires_in=REFRESH_LIFE, hard_expires_in=HARD_LIFE
        ),
        clock,
    )
    server = Server(simulator.make_app())
    simulator.base_url = await server.start()
    yield simulator, server
    await simulator.close()  # releases hung calls
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # The session default timeout (300 s) stays: per-call timeouts must do the work.
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def client(
    sim: tuple[IntuitSimulator, Server], session: aiohttp.ClientSession, clock: ManualClock
) -> IntuitClient:
    return IntuitClient(session, intuit_config(sim[0].base_url), clock)


@pytest.fixture
async def fake() -> AsyncIterator[FakeIntuit]:
    server = FakeIntuit()
    await server.server.start()
    yield server
    await server.server.close()


@pytest.fixture
def fake_client(
    fake: FakeIntuit, session: aiohttp.ClientSession, clock: ManualClock
) -> IntuitClient:
    base = fake.server.base_url
    config = intuit_config(
        base, token_endpoint=f"{base}/token", revocation_endpoint=f"{base}/revoke"
    )
    return IntuitClient(session, config, clock)


async def authorize(client: IntuitClient, session: aiohttp.ClientSession) -> dict[str, str]:
    """The browser's consent step: the simulator redirects with code, state and realmId."""
    url = client.authorization_url("state-" + "x" * 20)
    async with session.get(URL(url, encoded=True), allow_redirects=False) as answer:
        assert answer.status == 302, await answer.text()
        location = URL(answer.headers["Location"])
    assert str(location.with_query(None)) == REDIRECT
    return dict(location.query)


async def connect(client: IntuitClient, session: aiohttp.ClientSession) -> TokenResult:
    return await client.exchange_code((await authorize(client, session))["code"])


def basic_auth(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


# -- the wire format ----------------------------------------------------------------


async def test_authorization_url_carries_the_oauth_parameters(
    client: IntuitClient, session: aiohttp.ClientSession
) -> None:
    url = URL(client.authorization_url("a-state-value-0123456789"))
    assert str(url.with_query(None)) == client.config.authorization_endpoint
    assert dict(url.query) == {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "scope": "com.intuit.quickbooks.accounting openid",
        "redirect_uri": REDIRECT,
        "state": "a-state-value-0123456789",
    }
    # Scopes are space-separated, encoded as %20 (Intuit's SDKs do the same).
    assert "scope=com.intuit.quickbooks.accounting%20openid" in str(url)

    query = await authorize(client, session)
    assert set(query) == {"code", "state", "realmId"}
    assert query["state"] == "state-" + "x" * 20


def test_authorization_url_extends_an_endpoint_that_has_a_query(
    session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    config = intuit_config(
        "https://intuit.example", authorization_endpoint="https://a.example/c?x=1"
    )
    url = IntuitClient(session, config, clock).authorization_url("s" * 20)
    parsed = URL(url)
    assert parsed.query["x"] == "1"
    assert parsed.query["state"] == "s" * 20


async def test_code_exchange_speaks_intuits_wire_format(
    sim: tuple[IntuitSimulator, Server], client: IntuitClient, session: aiohttp.ClientSession
) -> None:
    simulator, server = sim
    query = await authorize(client, session)
    result = await client.exchange_code(query["code"])

    [request] = [s for s in server.seen if s.path.endswith("/tokens/bearer")]
    assert request.method == "POST"
    assert request.headers["Authorization"] == basic_auth()
    assert request.headers["Accept"] == "application/json"
    assert request.headers[HARD_EXPIRY_HEADER] == "true"
    assert request.form() == {
        "grant_type": "authorization_code",
        "code": query["code"],
        "redirect_uri": REDIRECT,
    }

    [entry] = [e for e in simulator.request_log if e.endpoint == "token"]
    assert entry.status == 200
    assert entry.realm_id == query["realmId"]
    tokens = result.tokens
    assert tokens.refresh_token == entry.issued_refresh_token
    assert simulator.is_access_token_valid(tokens.access_token)
    assert result.intuit_tid == entry.intuit_tid
    # Absolute times, computed from the answer's lifetimes at the moment of the request.
    assert tokens.obtained_at == START
    assert tokens.token_expires_at == START + timedelta(seconds=ACCESS_LIFE)
    assert tokens.refresh_token_expires_at == START + timedelta(seconds=REFRESH_LIFE)
    assert tokens.refresh_token_hard_expires_at == START + timedelta(seconds=HARD_LIFE)


async def test_refresh_speaks_intuits_wire_format_and_counts_from_the_answer(
    sim: tuple[IntuitSimulator, Server],
    client: IntuitClient,
    session: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    simulator, server = sim
    first = (await connect(client, session)).tokens
    clock.advance(1000)
    server.seen.clear()

    result = await client.refresh(first.refresh_token)

    [request] = server.seen
    assert request.headers["Authorization"] == basic_auth()
    assert request.headers["Accept"] == "application/json"
    assert request.headers[HARD_EXPIRY_HEADER] == "true"
    assert request.form() == {"grant_type": "refresh_token", "refresh_token": first.refresh_token}
    tokens = result.tokens
    now = START + timedelta(seconds=1000)
    assert tokens.obtained_at == now
    assert tokens.token_expires_at == now + timedelta(seconds=ACCESS_LIFE)
    # x_refresh_token_expires_in counts down between rotations: the same instant as before.
    assert tokens.refresh_token_expires_at == first.refresh_token_expires_at
    assert tokens.refresh_token_hard_expires_at == first.refresh_token_hard_expires_at
    assert tokens.refresh_token == first.refresh_token  # not rotated yet (rotate_after = 1 day)
    assert tokens.access_token != first.access_token
    assert result.intuit_tid == simulator.request_log[-1].intuit_tid


async def test_refresh_returns_the_rotated_refresh_token(
    sim: tuple[IntuitSimulator, Server], client: IntuitClient, session: aiohttp.ClientSession
) -> None:
    simulator, _ = sim
    simulator.settings.update(rotate_after=0)
    first = (await connect(client, session)).tokens
    second = (await client.refresh(first.refresh_token)).tokens
    assert second.refresh_token != first.refresh_token
    assert second.refresh_token == simulator.request_log[-1].issued_refresh_token
    with pytest.raises(InvalidGrantError):
        await client.refresh(first.refresh_token)  # the old value died at once


async def test_revoke_sends_json_with_basic_auth(
    sim: tuple[IntuitSimulator, Server], client: IntuitClient, session: aiohttp.ClientSession
) -> None:
    simulator, server = sim
    tokens = (await connect(client, session)).tokens
    server.seen.clear()

    tid = await client.revoke(tokens.refresh_token)

    [request] = server.seen
    assert request.path.endswith("/tokens/revoke")
    assert request.headers["Authorization"] == basic_auth()
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {"token": tokens.refresh_token}
    assert tid is not None
    assert tid == simulator.request_log[-1].intuit_tid
    assert not simulator.is_access_token_valid(tokens.access_token)
    with pytest.raises(InvalidGrantError):
        await client.refresh(tokens.refresh_token)


# -- strict parsing -------------------------------------------------------------------


async def test_lifetimes_default_to_an_hour_and_100_days_when_absent(
    fake: FakeIntuit, fake_client: IntuitClient
) -> None:
    fake.queue(200, {"access_token": "at-1", "refresh_token": "rt-1", "token_type": "bearer"})
    tokens = (await fake_client.exchange_code("code-1")).tokens
    assert tokens.access_token == "at-1"
    assert tokens.refresh_token == "rt-1"
    assert tokens.token_expires_at == START + timedelta(seconds=3600)
    assert tokens.refresh_token_expires_at == START + timedelta(days=100)
    assert tokens.refresh_token_hard_expires_at is None


async def test_lifetimes_come_from_the_answer(fake: FakeIntuit, fake_client: IntuitClient) -> None:
    fake.queue(
        200,
        {
            "access_token": "at-1",
            "refresh_token": "rt-1",
            "expires_in": 1234,
            "x_refresh_token_expires_in": 8_726_400,
            "x_refresh_token_hard_expires_in": 157_000_000,
        },
        intuit_tid="tid-42",
    )
    result = await fake_client.exchange_code("code-1")
    tokens = result.tokens
    assert tokens.token_expires_at == START + timedelta(seconds=1234)
    assert tokens.refresh_token_expires_at == START + timedelta(seconds=8_726_400)
    assert tokens.refresh_token_hard_expires_at == START + timedelta(seconds=157_000_000)
    assert result.intuit_tid == "tid-42"


async def test_a_refresh_answer_without_refresh_token_keeps_the_old_one(
    fake: FakeIntuit, fake_client: IntuitClient
) -> None:
    fake.queue(200, {"access_token": "at-2", "expires_in": 3600})
    tokens = (await fake_client.refresh("rt-old-value")).tokens
    assert tokens.access_token == "at-2"
    assert tokens.refresh_token == "rt-old-value"


async def test_a_code_exchange_without_refresh_token_is_refused(
    fake: FakeIntuit, fake_client: IntuitClient
) -> None:
    fake.queue(200, {"access_token": "at-2", "expires_in": 3600})
    with pytest.raises(TransientIntuitError) as caught:
        await fake_client.exchange_code("code-1")
    assert caught.value.code == "no_refresh_token"


@pytest.mark.parametrize(
    "body",
    [
        {"access_token": "", "refresh_token": "rt"},
        {"access_token": 12345, "refresh_token": "rt"},
        ["access_token", "rt"],
        "at",
    ],
    ids=[
        "empty-access-token",
        "number-access-token",
        "json-list",
        "json-string",
    ],
)
async def test_a_200_with_a_bad_body_is_transient_and_stores_nothing(
    fake: FakeIntuit, fake_client: IntuitClient, body: Any
) -> None:
    fake.queue(200, body, intuit_tid="tid-bad")
    with pytest.raises(TransientIntuitError) as caught:
        await fake_client.refresh("rt-old-value")
    assert caught.value.status == 200
    assert caught.value.code in {"malformed_body", "no_access_token"}
    assert caught.value.intuit_tid == "tid-bad"


@pytest.mark.parametrize("expires_in", [-5, "soon", True], ids=["negative", "text", "bool"])
async def test_a_garbled_expires_in_keeps_the_rotated_token_and_assumes_a_short_life(
    fake: FakeIntuit, fake_client: IntuitClient, expires_in: object
) -> None:
    fake.queue(200, {"access_token": "at", "refresh_token": "rt-rotated", "expires_in": expires_in})
    result = await fake_client.refresh("rt-old-value")
    tokens = result.tokens
    assert tokens.refresh_token == "rt-rotated"
    assert tokens.token_expires_at - tokens.obtained_at == timedelta(minutes=5)


@pytest.mark.parametrize(
    "extra",
    [{"x_refresh_token_expires_in": [1]}, {"x_refresh_token_hard_expires_in": {}}],
    ids=["list-refresh-life", "object-hard-life"],
)
async def test_a_garbled_refresh_token_lifetime_keeps_the_rotated_token(
    fake: FakeIntuit, fake_client: IntuitClient, extra: dict[str, Any]
) -> None:
    # Losing a rotated refresh token loses the connection; its advisory lifetime
    # reads as absent (100 days, no hard expiry) instead.
    fake.queue(200, {"access_token": "at", "refresh_token": "rt-rotated", **extra})
    result = await fake_client.refresh("rt-old-value")
    tokens = result.tokens
    assert tokens.refresh_token == "rt-rotated"
    if "x_refresh_token_expires_in" in extra:
        assert tokens.refresh_token_expires_at - tokens.obtained_at == timedelta(days=100)
    else:
        assert tokens.refresh_token_hard_expires_at is None


# -- failure classification: every simulator fault --------------------------------------

# kind -> (error class, HTTP status, code, retry_after)
EXPECTED: dict[str, tuple[type[IntuitError], int | None, str, float | None]] = {
    "500": (TransientIntuitError, 500, "internal_server_error", None),
    "502_html": (TransientIntuitError, 502, "http_502", None),
    "html": (TransientIntuitError, 502, "http_502", None),
    "503": (TransientIntuitError, 503, "http_503", 2.0),
    "429": (TransientIntuitError, 429, "too_many_requests", 2.0),
    "hang": (TransientIntuitError, None, "timeout", None),
    "malformed": (TransientIntuitError, 200, "malformed_body", None),
    "no_token": (TransientIntuitError, 200, "no_access_token", None),
    "invalid_grant": (InvalidGrantError, 400, "invalid_grant", None),
    "invalid_client": (InvalidClientError, 401, "invalid_client", None),
    "reset": (TransientIntuitError, None, "connection_error", None),
}


def test_every_simulator_fault_kind_is_classified_here() -> None:
    assert set(EXPECTED) == set(FAULT_KINDS)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_each_simulator_fault_is_classified(
    sim: tuple[IntuitSimulator, Server],
    client: IntuitClient,
    session: aiohttp.ClientSession,
    kind: str,
) -> None:
    simulator, _ = sim
    tokens = (await connect(client, session)).tokens
    client.config = replace(client.config, timeout=timedelta(seconds=0.5))
    simulator.inject(kind)

    started = time.monotonic()
    with pytest.raises(IntuitError) as caught:
        await client.refresh(tokens.refresh_token)
    elapsed = time.monotonic() - started

    error = caught.value
    cls, status, code, retry_after = EXPECTED[kind]
    assert type(error) is cls
    assert (error.status, error.code) == (status, code)
    if isinstance(error, TransientIntuitError):
        assert error.retry_after == retry_after
    entry = simulator.request_log[-1]
    assert entry.fault == kind
    # intuit_tid is carried when Intuit answered at all.
    assert error.intuit_tid == (None if kind in ("hang", "reset") else entry.intuit_tid)
    assert tokens.refresh_token not in str(error)
    if kind == "hang":
        assert elapsed < 30, "the per-call timeout was not honoured (the session's is 300 s)"
    if kind in ("502_html", "html"):
        assert "HTML" in str(error)


@pytest.mark.parametrize(
    ("sent", "expected"), [(7, 7.0), (0.5, 0.5), (0, 0.0)], ids=["seconds", "fraction", "zero"]
)
@pytest.mark.parametrize("kind", ["503", "429"])
async def test_retry_after_in_seconds_is_parsed(
    sim: tuple[IntuitSimulator, Server],
    client: IntuitClient,
    session: aiohttp.ClientSession,
    kind: str,
    sent: float,
    expected: float,
) -> None:
    simulator, _ = sim
    tokens = (await connect(client, session)).tokens
    simulator.inject(kind, retry_after=sent)
    with pytest.raises(TransientIntuitError) as caught:
        await client.refresh(tokens.refresh_token)
    assert caught.value.retry_after == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (format_datetime(START + timedelta(seconds=120), usegmt=True), 120.0),
        (format_datetime(START - timedelta(seconds=120), usegmt=True), 0.0),
        ("Sun, 01 Mar 2026 12:01:30 -0000", 90.0),
        (" 30 ", 30.0),
        ("2.5", 2.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
    ],
    ids=[
        "http-date",
        "past-http-date",
        "minus-zero-zone",
        "spaces",
        "fraction",
        "negative",
        "nan",
        "inf",
        "garbage",
        "empty",
    ],
)
async def test_retry_after_as_http_date_or_garbage(
    fake: FakeIntuit, fake_client: IntuitClient, header: str, expected: float | None
) -> None:
    fake.queue(503, raw=b"<html>busy</html>", **{"Retry-After": header, "intuit_tid": "tid-9"})
    with pytest.raises(TransientIntuitError) as caught:
        await fake_client.refresh("rt-old-value")
    assert caught.value.retry_after == expected
    assert caught.value.status == 503
    assert caught.value.intuit_tid == "tid-9"


@pytest.mark.parametrize("kind", ["503", "invalid_client", "reset", "502_html"])
async def test_revoke_failures_are_classified(
    sim: tuple[IntuitSimulator, Server],
    client: IntuitClient,
    session: aiohttp.ClientSession,
    kind: str,
) -> None:
    simulator, _ = sim
    tokens = (await connect(client, session)).tokens
    simulator.inject(kind, endpoint="revoke")
    with pytest.raises(IntuitError) as caught:
        await client.revoke(tokens.refresh_token)
    cls = InvalidClientError if kind == "invalid_client" else TransientIntuitError
    assert type(caught.value) is cls
    assert tokens.refresh_token not in str(caught.value)
    assert simulator.is_access_token_valid(tokens.access_token)  # a fault revokes nothing


async def test_wrong_client_secret_is_invalid_client(
    sim: tuple[IntuitSimulator, Server], session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    simulator, _ = sim
    good = IntuitClient(session, intuit_config(simulator.base_url), clock)
    tokens = (await connect(good, session)).tokens
    bad = IntuitClient(
        session,
        intuit_config(simulator.base_url, client_secret=Secret("not-the-secret")),
        clock,
    )
    with pytest.raises(InvalidClientError) as caught:
        await bad.refresh(tokens.refresh_token)
    assert caught.value.status == 401
    assert "client_id and client_secret" in str(caught.value)
    assert "not-the-secret" not in str(caught.value)
    assert caught.value.intuit_tid == simulator.request_log[-1].intuit_tid


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (400, {"error": "unauthorized_client"}, InvalidClientError, "unauthorized_client"),
        (401, None, InvalidClientError, "invalid_client"),
        (400, {"error": "invalid_request"}, TransientIntuitError, "invalid_request"),
        (404, {"message": "no such route"}, TransientIntuitError, "http_404"),
        (
            400,
            {"error": "invalid_grant", "error_description": "Token invalid"},
            InvalidGrantError,
            "invalid_grant",
        ),
    ],
    ids=["unauthorized_client", "bare-401", "invalid_request", "unexpected-404", "invalid_grant"],
)
async def test_error_answers_are_classified(
    fake: FakeIntuit,
    fake_client: IntuitClient,
    status: int,
    body: Any,
    cls: type[IntuitError],
    code: str,
) -> None:
    if body is None:
        fake.queue(status, raw=b"", intuit_tid="tid-e")
    else:
        fake.queue(status, body, intuit_tid="tid-e")
    with pytest.raises(IntuitError) as caught:
        await fake_client.refresh("rt-old-value")
    assert type(caught.value) is cls
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.intuit_tid == "tid-e"


async def test_an_unreachable_intuit_is_transient(
    session: aiohttp.ClientSession, clock: ManualClock
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    client = IntuitClient(session, intuit_config(closed), clock)
    with pytest.raises(TransientIntuitError) as caught:
        await client.refresh("rt-old-value")
    assert caught.value.code == "connection_error"
    assert caught.value.status is None
    assert "rt-old-value" not in str(caught.value)


@pytest.mark.parametrize("call", ["refresh", "exchange_code", "revoke"])
@pytest.mark.parametrize("error", ["invalid_grant", "invalid_request"])
async def test_errors_never_repeat_the_token_presented(
    fake: FakeIntuit, fake_client: IntuitClient, call: str, error: str
) -> None:
    """Even when the server echoes the token in its error_description."""
    secret = "tok-" + "s3cr3t" * 6
    fake.queue(400, {"error": error, "error_description": f"Token {secret} is not valid"})
    if call == "revoke" and error == "invalid_request":  # asked again with an RFC 7009 form
        fake.queue(400, {"error": error, "error_description": f"Token {secret} is not valid"})
    with pytest.raises(IntuitError) as caught:
        await getattr(fake_client, call)(secret)
    message = str(caught.value)
    assert secret not in message
    assert secret[:20] not in message
    assert "is not valid" in message  # Intuit's own words are kept around the hole


async def test_client_secret_is_sent_only_in_the_basic_header(
    fake: FakeIntuit, fake_client: IntuitClient
) -> None:
    fake.queue(200, {"access_token": "at", "refresh_token": "rt"})
    await fake_client.refresh("rt-old-value")
    [request] = fake.server.seen
    assert CLIENT_SECRET.encode() not in request.body
    assert parse_qs(request.body.decode()) == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["rt-old-value"],
    }
    assert request.headers["Authorization"] == basic_auth()
