"""The host-app client (``qbo_daemon.client``) against a real daemon and the real simulator.

Every test runs twice: with the blocking ``TokenClient`` (in a worker thread,
while the daemon serves on this loop) and its ``requests`` auth, and with the
``AsyncTokenClient`` and its aiohttp middleware. A stand-in QuickBooks API
(tests/host_app.py) accepts exactly the tokens the simulator says are
live. Each error is met by putting the account really into that state.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import requests

from qbo_daemon.cli.demo import free_port
from qbo_daemon.client import (
    DEFAULT_MARGIN,
    DEFAULT_RETRY_AFTER,
    ApiKeyRejected,
    AsyncTokenClient,
    ConnectRequired,
    DaemonError,
    DaemonUnreachable,
    Disconnected,
    NeedsReconnect,
    Token,
    TokenClient,
    Unavailable,
    UnknownAccount,
)
from qbo_daemon.client.errors import error_from_answer, parse_retry_after
from qbo_daemon.client.tokens import QUICKBOOKS_API_BASES
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, wait_for
from tests.host_app import (
    STALE,
    QuickBooksApi,
    browse,
    import_account,
    import_stale,
    serve_quickbooks,
)


class Shifted:
    """The client's clock: real time moved by ``by``."""

    def __init__(self) -> None:
        self.by = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.by


class Client:
    """One interface over both clients and both auth helpers, so each test runs on both."""

    def __init__(self, kind: str, url: str, key: str, **options: Any) -> None:
        self.kind = kind
        self.sync = TokenClient(url, key, **options) if kind == "sync" else None
        self.aio = AsyncTokenClient(url, key, **options) if kind == "async" else None

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.sync is not None:
            return await asyncio.to_thread(getattr(self.sync, name), *args, **kwargs)
        return await getattr(self.aio, name)(*args, **kwargs)

    async def token(self, account_id: str, **kwargs: Any) -> Token:
        token: Token = await self.call("token", account_id, **kwargs)
        return token

    async def error(self, name: str, *args: Any, **kwargs: Any) -> Exception:
        """The client error a call raises (fails the test if it raises none)."""
        with pytest.raises(Exception) as caught:  # noqa: PT011 - each caller checks the type
            await self.call(name, *args, **kwargs)
        return caught.value

    async def send(
        self,
        method: str,
        url: str,
        account_id: str,
        *,
        body: Any = None,
        with_authorize_url: bool = False,
        api_base: str | tuple[str, ...] | None = None,
    ) -> tuple[int, Any]:
        """A QuickBooks call through the auth helper: requests, or aiohttp's middleware.

        ``api_base`` is the origin of ``url`` (the stand-in) unless given.
        """
        base = api_base or url
        if self.sync is not None:
            auth = self.sync.requests_auth(
                account_id, with_authorize_url=with_authorize_url, api_base=base
            )

            def go() -> tuple[int, Any]:
                with requests.Session() as http:
                    answer = http.request(method, url, json=body, auth=auth, timeout=30)
                    return answer.status_code, answer.json()

            return await asyncio.to_thread(go)
        assert self.aio is not None
        middleware = self.aio.aiohttp_auth(
            account_id, with_authorize_url=with_authorize_url, api_base=base
        )
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, url, json=body, middlewares=(middleware,)) as answer,
        ):
            return answer.status, await answer.json()

    async def close(self) -> None:
        if self.aio is not None:
            await self.aio.aclose()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def running(daemon_factory: StartDaemon) -> RunningDaemon:
    return await daemon_factory()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


@pytest.fixture
def client_for(kind: str, clients: list[Client]) -> Any:
    def make(running: RunningDaemon, *, key: str | None = None, **options: Any) -> Client:
        client = Client(kind, running.api_url, key or running.api_key, **options)
        clients.append(client)
        return client

    return make


@pytest.fixture
async def quickbooks(simulator: IntuitSimulator) -> AsyncIterator[QuickBooksApi]:
    async with serve_quickbooks(simulator) as api:
        yield api


def refreshes(running: RunningDaemon) -> int:
    log = running.simulator.request_log
    return sum(1 for e in log if e.endpoint == "token" and e.grant_type == "refresh_token")


# -- tokens and the cache -----------------------------------------------------------


async def test_a_token_is_kept_until_shortly_before_it_expires(
    running: RunningDaemon, client_for: Any
) -> None:
    clock = Shifted()
    client: Client = client_for(running, now=clock)
    grant = await import_account(running)

    first = await client.token("acme")
    assert running.simulator.is_access_token_valid(first.access_token)
    assert first.realm_id == grant["realm_id"]
    assert first.access_token not in repr(first)

    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 200
    _, served = await running.api("GET", "/v1/accounts/acme/token")
    assert served["access_token"] != first.access_token

    assert await client.token("acme") == first  # cached: no call to the daemon
    clock.by = first.expires_at - DEFAULT_MARGIN - datetime.now(UTC) - timedelta(seconds=5)
    assert await client.token("acme") == first
    clock.by += timedelta(seconds=10)  # inside the margin: asked anew
    assert (await client.token("acme")).access_token == served["access_token"]


async def test_askers_at_once_share_one_call_to_the_daemon(
    daemon_factory: StartDaemon, client_for: Any, kind: str
) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)  # conftest resets logging afterwards
    running = await daemon_factory()
    running.simulator.settings.update(latency=0.3)  # the first ask waits for a refresh
    await import_account(running)
    client: Client = client_for(running)

    tokens = await asyncio.gather(*(client.token("acme") for _ in range(6)))
    assert len({t.access_token for t in tokens}) == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    asks = [
        e
        for e in lines
        if e["event"] == "http.request_served" and e.get("path") == "/v1/accounts/acme/token"
    ]
    assert len(asks) == 1, f"{kind}: {len(asks)} calls to the daemon"
    assert running.api_key not in stream.getvalue()


# -- every error, by really putting the account in that state -------------------------


async def test_unknown_account_even_after_the_user_declines(
    running: RunningDaemon, client_for: Any
) -> None:
    client: Client = client_for(running)
    error = await client.error("token", "ghost")
    assert isinstance(error, UnknownAccount)
    assert isinstance(error, ConnectRequired)
    assert (error.status, error.code, error.account_id) == (404, "not_found", "ghost")
    assert error.authorize_url is None

    url: str = await client.call("authorize_url", "ghost")
    running.simulator.deny_next_authorization()
    assert await browse(url) == 400  # the callback's "you declined" page

    error = await client.error("token", "ghost", with_authorize_url=True)
    assert isinstance(error, UnknownAccount)
    assert error.authorize_url is not None
    assert error.authorize_url.startswith(running.simulator.authorization_endpoint + "?")
    assert error.authorize_url != url  # a fresh state
    assert error.authorize_url not in str(error)


async def test_needs_reconnect_carries_a_url_that_reconnects(
    running: RunningDaemon, client_for: Any
) -> None:
    client: Client = client_for(running)
    await import_account(running)
    token = await client.token("acme")
    # The user disconnects the app inside QuickBooks: Intuit kills the connection.
    running.simulator.invalidate(token.access_token)

    error = await client.error("refresh", "acme")
    assert isinstance(error, NeedsReconnect)
    assert (error.status, error.code, error.authorize_url) == (409, "needs_reconnect", None)
    assert "invalid_grant" in error.detail

    error = await client.error("token", "acme", with_authorize_url=True)
    assert isinstance(error, NeedsReconnect)
    assert error.authorize_url is not None
    running.simulator.choose_realm(token.realm_id)  # the user picks the same company again
    assert await browse(error.authorize_url) == 200  # the user reconnects

    fresh = await client.token("acme")
    assert fresh.access_token != token.access_token
    assert running.simulator.is_access_token_valid(fresh.access_token)


async def test_disconnected_through_the_auth_helper_and_the_client(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    grant = await import_account(running)
    token = await client.token("acme")  # cached
    status, answer = await running.api("DELETE", "/v1/accounts/acme")
    assert (status, answer["revoke"]) == (200, "revoked")

    # The cached token was revoked: QuickBooks refuses it, the daemon says disconnected.
    url = quickbooks.company_info_url(grant["realm_id"])
    with pytest.raises(Disconnected) as caught:
        await client.send("GET", url, "acme", with_authorize_url=True)
    assert caught.value.authorize_url is not None
    assert quickbooks.tokens_presented() == [token.access_token]

    error = await client.error("token", "acme")
    assert isinstance(error, Disconnected)
    assert (error.status, error.code, error.authorize_url) == (409, "disconnected", None)


async def test_unavailable_while_intuit_is_down_then_served_again(
    daemon_factory: StartDaemon, client_for: Any
) -> None:
    running = await daemon_factory(backoff_max="2s")
    client: Client = client_for(running, default_retry_after=0.25)
    running.simulator.inject("502_html", 1000)  # Intuit's nginx answers for a while
    await import_account(running)  # no access token yet: the first refresh fails

    async def failed() -> bool:
        _, account = await running.api("GET", "/v1/accounts/acme")
        return bool(account["failure_count"] >= 1)

    await wait_for(failed)
    error = await client.error("token", "acme")
    assert isinstance(error, Unavailable)
    assert not isinstance(error, DaemonUnreachable)
    assert (error.status, error.code, error.retry_after) == (503, "unavailable", 0.25)

    running.simulator.reset()  # Intuit is back; retry as the error advises
    async with asyncio.timeout(30):
        while True:
            try:
                token = await client.token("acme")
                break
            except Unavailable as exc:
                await asyncio.sleep(exc.retry_after)
    assert running.simulator.is_access_token_valid(token.access_token)


async def test_a_wrong_key_a_bad_id_and_no_daemon(running: RunningDaemon, client_for: Any) -> None:
    await import_account(running)
    wrong: Client = client_for(running, key="not-a-key-of-this-daemon")
    error = await wrong.error("token", "acme")
    assert isinstance(error, ApiKeyRejected)
    assert (error.status, error.code) == (401, "unauthorized")
    assert "not-a-key" not in str(error)

    client: Client = client_for(running)
    error = await client.error("token", "no/such")
    assert isinstance(error, DaemonError)
    assert (error.status, error.code) == (400, "invalid_account_id")

    gone = Client(client.kind, f"http://127.0.0.1:{free_port()}", running.api_key, timeout=5)
    error = await gone.error("token", "acme")
    await gone.close()
    assert isinstance(error, DaemonUnreachable)
    assert isinstance(error, Unavailable)
    assert (error.status, error.code, error.retry_after) == (
        None,
        "unreachable",
        DEFAULT_RETRY_AFTER,
    )
    assert running.api_key not in str(error)


# -- the auth helpers against the stand-in QuickBooks API ----------------------------------


async def test_a_rejected_token_is_refreshed_once_and_the_request_sent_again(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    grant = await import_stale(running)
    invoice = {"Line": [{"Amount": 100.0, "DetailType": "SalesItemLineDetail"}]}

    status, answer = await client.send(
        "POST", quickbooks.invoice_url(grant["realm_id"]), "acme", body=invoice
    )
    assert status == 200, answer
    first, retry = quickbooks.seen
    assert (first.access_token, first.status) == (STALE, 401)
    assert retry.status == 200
    assert json.loads(retry.body) == json.loads(first.body) == invoice
    assert refreshes(running) == 1  # the daemon still served the stale token: refreshed

    status, _ = await client.send("GET", quickbooks.company_info_url(grant["realm_id"]), "acme")
    assert status == 200
    assert quickbooks.seen[-1].access_token == retry.access_token  # cached
    assert (len(quickbooks.seen), refreshes(running)) == (3, 1)


async def test_a_token_the_daemon_already_replaced_needs_no_refresh(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    grant = await import_stale(running)
    assert (await client.token("acme")).access_token == STALE  # cached
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")  # someone else
    assert (status, refreshes(running)) == (200, 1)

    status, _ = await client.send("GET", quickbooks.company_info_url(grant["realm_id"]), "acme")
    assert status == 200
    assert [s.status for s in quickbooks.seen] == [401, 200]
    assert refreshes(running) == 1


async def test_requests_rejected_together_share_one_refresh(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    grant = await import_stale(running)
    assert (await client.token("acme")).access_token == STALE  # every request starts with it
    url = quickbooks.company_info_url(grant["realm_id"])

    answers = await asyncio.gather(*(client.send("GET", url, "acme") for _ in range(4)))
    assert [status for status, _ in answers] == [200] * 4
    assert refreshes(running) == 1
    rejected = [s.access_token for s in quickbooks.seen if s.status == 401]
    accepted = {s.access_token for s in quickbooks.seen if s.status == 200}
    assert (rejected, len(accepted)) == ([STALE] * 4, 1)


async def test_a_second_401_goes_back_to_the_caller(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    await import_account(running)
    quickbooks.unknown_realms.add("9999")  # not this token's company

    status, answer = await client.send("GET", quickbooks.company_info_url("9999"), "acme")
    assert (status, answer["Fault"]["type"]) == (401, "AUTHENTICATION")
    first, retry = quickbooks.tokens_presented()
    assert first != retry  # asked once (a refresh, as the daemon served the same token)
    assert refreshes(running) == 2  # the import's own refresh, and that one


async def test_a_revoked_connection_raises_needs_reconnect_from_the_call(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    grant = await import_account(running)
    token = await client.token("acme")
    running.simulator.invalidate(token.access_token)  # disconnected inside QuickBooks

    with pytest.raises(NeedsReconnect) as caught:
        await client.send(
            "GET", quickbooks.company_info_url(grant["realm_id"]), "acme", with_authorize_url=True
        )
    assert caught.value.authorize_url is not None
    assert quickbooks.tokens_presented() == [token.access_token]  # not sent again


async def test_the_token_goes_only_to_quickbooks(
    running: RunningDaemon, client_for: Any, quickbooks: QuickBooksApi
) -> None:
    client: Client = client_for(running)
    realm = (await import_account(running))["realm_id"]
    token = await client.token("acme")

    # Redirected to another origin (localhost is not 127.0.0.1): no token there.
    status, _ = await client.send("GET", quickbooks.moved_url(realm), "acme")
    assert status == 401
    assert quickbooks.tokens_presented() == [token.access_token, ""]

    # By default the token goes to Intuit's API only, not to this stand-in.
    url = quickbooks.company_info_url(realm)
    status, _ = await client.send("GET", url, "acme", api_base=QUICKBOOKS_API_BASES)
    assert status == 401
    assert quickbooks.tokens_presented() == [token.access_token, "", ""]  # nor retried
    assert refreshes(running) == 1  # the import's own


# -- pieces without a daemon ------------------------------------------------------------


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    now = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("Fri, 31 Jan 2025 12:00:30 GMT", now) == 30.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(bad, now) is None

    error = error_from_answer(503, b'{"error": "unavailable", "detail": "x"}', "12", account_id="a")
    assert isinstance(error, Unavailable)
    assert error.retry_after == 12.0
    proxy = error_from_answer(502, b"<html>bad gateway</html>", None, account_id="a")
    assert isinstance(proxy, Unavailable)
    assert (proxy.code, proxy.retry_after) == ("http_error", DEFAULT_RETRY_AFTER)
    assert "<html>" not in str(proxy)


def test_importing_the_client_loads_none_of_the_daemon() -> None:
    probe = (
        "import sys, qbo_daemon.client\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('qbo_daemon'))))\n"
        "print(' '.join(m for m in ('structlog', 'aiosqlite', 'cryptography',"
        " 'prometheus_client', 'requests') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    ours, others = result.stdout.splitlines()
    assert set(ours.split()) == {
        "qbo_daemon",
        "qbo_daemon.client",
        "qbo_daemon.client.aio",
        "qbo_daemon.client.errors",
        "qbo_daemon.client.sync",
        "qbo_daemon.client.tokens",
    }
    assert others == ""
