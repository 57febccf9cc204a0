"""The connect flow over real HTTP on loopback: token API -> simulator consent -> callback.

A real daemon (tests.harness) runs against the real simulator; the browser is a
plain aiohttp client that does not follow redirects, so every hop is checked.
Rows are read with ``sqlite3`` as an operator would read them.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from qbo_daemon.core.models import ACCOUNT_ID_RULE, iso, valid_account_id
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator, RequestLogEntry
from qbo_daemon.store.schema import sha256_hex
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, next_refresh, run_daemon
from tests.manual_clock import ManualClock

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ACCESS_LIFE = 2400  # not Intuit's 3600: proves the expiry is read from the answer
REFRESH_LIFE = 6_000_000
HARD_LIFE = 150_000_000
LEAD = timedelta(minutes=10)
STATE_TTL = timedelta(minutes=10)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True)
class Page:
    status: int
    headers: CIMultiDict[str]
    text: str


async def browse(url: str | URL, method: str = "GET") -> Page:
    """One browser request, redirects not followed, the URL sent exactly as given."""
    target = url if isinstance(url, URL) else URL(url, encoded=True)
    async with (
        aiohttp.ClientSession() as browser,
        browser.request(method, target, allow_redirects=False) as answer,
    ):
        return Page(answer.status, CIMultiDict(answer.headers), await answer.text())


async def authorize_url(running: RunningDaemon, account_id: str) -> str:
    status, body = await running.api("POST", f"/v1/accounts/{account_id}/authorize-url")
    assert status == 200, body
    url: str = body["url"]
    return url


async def consent(url: str) -> URL:
    """The user consents at "Intuit": the simulator's redirect to our callback."""
    page = await browse(url)
    assert page.status == 302, page.text
    return URL(page.headers["Location"], encoded=True)


async def callback_url(running: RunningDaemon, account_id: str) -> URL:
    return await consent(await authorize_url(running, account_id))


def with_query(url: URL, **changes: str | None) -> URL:
    """``url`` with query parameters replaced (or dropped, for None)."""
    query = {k: v for k, v in url.query.items() if k not in changes}
    query.update({k: v for k, v in changes.items() if v is not None})
    return url.with_query(query)


def exchanges(simulator: IntuitSimulator) -> list[RequestLogEntry]:
    """Every call on the token endpoint that traded an authorization code."""
    return [
        e
        for e in simulator.request_log
        if e.endpoint == "token" and e.grant_type == "authorization_code"
    ]


def token_calls(simulator: IntuitSimulator) -> list[RequestLogEntry]:
    return [e for e in simulator.request_log if e.endpoint == "token"]


def db_rows(running: RunningDaemon, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    db = sqlite3.connect(running.database)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def account_row(running: RunningDaemon, account_id: str) -> sqlite3.Row:
    [row] = db_rows(running, "SELECT * FROM accounts WHERE account_id = ?", (account_id,))
    return row


def account_count(running: RunningDaemon) -> int:
    return int(db_rows(running, "SELECT COUNT(*) FROM accounts")[0][0])


def database_bytes(running: RunningDaemon) -> bytes:
    path = running.database
    files = [path, path.with_name(path.name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def assert_says(page: Page, status: int, *phrases: str) -> None:
    assert page.status == status, page.text
    assert page.headers["Content-Type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    for phrase in phrases:
        assert phrase in page.text, page.text


def assert_not_shown(page: Page, *secrets_: str) -> None:
    shown = page.text + "\n" + "\n".join(f"{k}: {v}" for k, v in page.headers.items())
    for secret in secrets_:
        assert secret not in shown


def state_of(url: str | URL) -> str:
    return URL(str(url), encoded=True).query["state"]


# -- the whole flow ------------------------------------------------------------------------


async def test_connect_stores_an_encrypted_row_with_times_from_intuits_answer(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    simulator.settings.update(
        expires_in=ACCESS_LIFE, refresh_expires_in=REFRESH_LIFE, hard_expires_in=HARD_LIFE
    )
    running = await daemon_factory(clock=ManualClock(START))

    url = URL(await authorize_url(running, "acme"))
    assert str(url.with_query(None)) == simulator.authorization_endpoint
    assert set(url.query) == {
        "client_id",
        "response_type",
        "scope",
        "redirect_uri",
        "state",
        "code_challenge",  # the tests' configuration turns PKCE on
        "code_challenge_method",
    }
    assert url.query["client_id"] == simulator.settings.client_id
    assert url.query["response_type"] == "code"
    assert url.query["scope"] == "com.intuit.quickbooks.accounting"
    assert url.query["redirect_uri"] == running.callback_url
    state = url.query["state"]
    assert len(state) >= 32
    [pending] = db_rows(running, "SELECT * FROM oauth_states")
    assert (pending["state_hash"], pending["account_id"]) == (sha256_hex(state), "acme")
    assert pending["expires_at"] == iso(START + STATE_TTL)
    assert pending["used_at"] is None

    back = await consent(str(url))
    assert str(back.with_query(None)) == running.callback_url
    code, realm_id = back.query["code"], back.query["realmId"]
    assert back.query["state"] == state
    assert exchanges(simulator) == []  # consent alone trades nothing

    page = await browse(back)
    assert_says(page, 200, "QuickBooks is connected")

    [exchange] = token_calls(simulator)
    assert (exchange.grant_type, exchange.status) == ("authorization_code", 200)
    account = await running.services.storage.load("acme")
    assert account.refresh_token == exchange.issued_refresh_token
    assert account.realm_id == realm_id
    assert account.access_token is not None
    assert account.refresh_token is not None
    assert simulator.is_access_token_valid(account.access_token)
    assert_not_shown(page, code, account.access_token, account.refresh_token)

    row = account_row(running, "acme")
    assert row["status"] == "active"
    assert (row["version"], row["failure_count"], row["last_error"]) == (1, 0, None)
    assert row["key_id"] == running.services.storage.primary_key_id
    for column, plain in (
        ("realm_id", realm_id),
        ("access_token", account.access_token),
        ("refresh_token", account.refresh_token),
    ):
        assert row[column], column
        assert plain not in row[column], f"{column} is stored in plain text"
    raw = database_bytes(running)
    for plain in (realm_id, account.access_token, account.refresh_token, code):
        assert plain.encode() not in raw
    assert row["token_expires_at"] == iso(START + timedelta(seconds=ACCESS_LIFE))
    assert row["reconnect_token_at"] == iso(START + timedelta(seconds=ACCESS_LIFE) - LEAD)
    assert row["refresh_token_expires_at"] == iso(START + timedelta(seconds=REFRESH_LIFE))
    assert row["refresh_token_hard_expires_at"] == iso(START + timedelta(seconds=HARD_LIFE))
    assert row["last_refreshed_at"] == iso(START)
    assert row["created_at"] == iso(START)

    # Scheduled at once, at its reconnect time, without waiting for any poll.
    assert (
        await next_refresh(running.services, "acme")
        == START + timedelta(seconds=ACCESS_LIFE) - LEAD
    )

    [used] = db_rows(running, "SELECT * FROM oauth_states")
    assert (used["used_at"], used["outcome"]) == (iso(START), "connected")

    status, shown = await running.api("GET", "/v1/accounts/acme")
    assert status == 200
    assert shown["status"] == "active"
    assert shown["realm_id"] == realm_id
    assert shown["token_expires_at"] == row["token_expires_at"]
    assert shown["next_refresh_at"] == row["reconnect_token_at"]


async def test_success_redirect_sends_the_browser_back_with_account_and_status(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    target = "https://app.example/qbo/done?from=qbo"
    running = await daemon_factory(success_redirect=target)
    back = await callback_url(running, "acme")

    for attempt in ("first", "double-fired"):
        page = await browse(back)
        assert page.status == 303, (attempt, page.text)
        location = URL(page.headers["Location"])
        assert str(location.with_query(None)) == "https://app.example/qbo/done"
        assert dict(location.query) == {"from": "qbo", "account_id": "acme", "status": "connected"}
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        account = await running.services.storage.load("acme")
        assert account.access_token
        assert account.refresh_token
        assert_not_shown(page, back.query["code"], account.access_token, account.refresh_token)
    assert len(exchanges(simulator)) == 1

    # Only a connection redirects; a refusal shows its page.
    simulator.deny_next_authorization()
    denied = await browse(await callback_url(running, "beta"))
    assert_says(denied, 400, "QuickBooks was not connected")


# -- bad input changes nothing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"state": None}, "no valid state"),
        ({"state": "short"}, "no valid state"),
        ({"state": "bad state with spaces and more"}, "no valid state"),
        ({"state": secrets.token_urlsafe(32)}, "not known"),
        ({"code": None}, "no authorization code"),
        ({"code": ""}, "no authorization code"),
        ({"code": "sim-ac-\x00\x07"}, "authorization code that is not valid"),
        ({"code": "x" * 5000}, "authorization code that is not valid"),
        ({"realmId": None}, "no company id (realmId)"),
        ({"realmId": "../../etc"}, "company id (realmId) that is not valid"),
    ],
    ids=[
        "missing-state",
        "short-state",
        "odd-state",
        "unknown-state",
        "missing-code",
        "empty-code",
        "control-chars-in-code",
        "over-long-code",
        "missing-realm",
        "odd-realm",
    ],
)
async def test_a_bad_callback_gets_a_clear_page_and_changes_nothing(
    daemon_factory: StartDaemon,
    simulator: IntuitSimulator,
    changes: dict[str, str | None],
    phrase: str,
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")

    page = await browse(with_query(back, **changes))

    assert_says(page, 400, phrase)
    assert_not_shown(page, back.query["code"])
    assert token_calls(simulator) == []
    assert account_count(running) == 0
    [state] = db_rows(running, "SELECT used_at, outcome FROM oauth_states")
    assert tuple(state) == (None, None)
    # Nothing was spent: the untouched callback still connects.
    assert_says(await browse(back), 200, "QuickBooks is connected")
    assert len(exchanges(simulator)) == 1


async def test_an_expired_state_is_refused(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    clock = ManualClock(START)
    running = await daemon_factory(clock=clock)
    fresh = await callback_url(running, "acme")
    stale = await callback_url(running, "beta")

    clock.advance(STATE_TTL.total_seconds() - 10)
    assert_says(await browse(fresh), 200, "QuickBooks is connected")

    clock.advance(20)
    page = await browse(stale)
    assert_says(page, 400, "This sign-in link has expired")
    assert [e.status for e in exchanges(simulator)] == [200]  # only acme's
    assert [r["account_id"] for r in db_rows(running, "SELECT * FROM accounts")] == ["acme"]
    [row] = db_rows(running, "SELECT used_at FROM oauth_states WHERE account_id = 'beta'")
    assert row["used_at"] is None


async def test_an_expired_state_row_is_refused_by_a_running_daemon(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    db = sqlite3.connect(running.database)
    try:
        with db:
            db.execute(
                "UPDATE oauth_states SET expires_at = ?",
                (iso(datetime.now(UTC) - timedelta(seconds=1)),),
            )
    finally:
        db.close()
    assert_says(await browse(back), 400, "expired")
    assert token_calls(simulator) == []
    assert account_count(running) == 0


async def test_a_state_used_by_a_failed_exchange_cannot_be_used_again(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    simulator.inject("invalid_grant")

    first = await browse(back)
    assert_says(first, 400, "Intuit refused the sign-in code")
    again = await browse(back)
    assert_says(again, 400, "already been used")
    assert_not_shown(again, back.query["code"])

    assert len(token_calls(simulator)) == 1
    assert account_count(running) == 0
    [state] = db_rows(running, "SELECT used_at, outcome FROM oauth_states")
    assert state["used_at"] is not None
    assert state["outcome"] == "exchange_failed"


async def test_a_used_state_with_a_new_code_exchanges_nothing(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    """A replayed state never trades a second code; only its first code sees the outcome."""
    running = await daemon_factory()
    url = await authorize_url(running, "acme")
    first, second = await consent(url), await consent(url)
    assert state_of(first) == state_of(second)
    assert first.query["code"] != second.query["code"]

    assert_says(await browse(first), 200, "QuickBooks is connected")
    before = tuple(account_row(running, "acme"))
    page = await browse(second)
    assert_says(page, 400, "already been used")
    assert_not_shown(page, first.query["code"], second.query["code"])
    assert_says(await browse(first), 200, "QuickBooks is connected")

    assert len(exchanges(simulator)) == 1
    assert tuple(account_row(running, "acme")) == before
    account = await running.services.storage.load("acme")
    assert account.realm_id == first.query["realmId"]


async def test_access_denied_writes_nothing_and_spends_the_state(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    simulator.deny_next_authorization()
    back = await callback_url(running, "acme")
    assert back.query["error"] == "access_denied"
    assert "code" not in back.query

    page = await browse(back)
    assert_says(page, 400, "QuickBooks was not connected", "Access was not granted")
    # Fired twice, the browser shows the same outcome.
    assert_says(await browse(back), 400, "QuickBooks was not connected")

    assert token_calls(simulator) == []
    assert account_count(running) == 0
    [state] = db_rows(running, "SELECT used_at, outcome FROM oauth_states")
    assert state["used_at"] is not None
    assert state["outcome"] == "denied"

    unknown = with_query(back, state=secrets.token_urlsafe(32))
    assert_says(await browse(unknown), 400, "not known")


BAD_ACCOUNT_IDS = [
    "a" * 129,
    "a%20b",
    "%20acme",
    "-acme",
    ".hidden",
    "%2e%2e",
    "a%2Fb",
    "..%2F..%2Fetc%2Fpasswd",
    "caf%C3%A9",
    "acme%00",
    "acme%0A",
    "acme%3Bdrop",
    "%3Cscript%3E",
]


@pytest.mark.parametrize("raw", BAD_ACCOUNT_IDS)
async def test_authorize_url_refuses_an_odd_account_id_naming_the_rule(
    daemon_factory: StartDaemon, raw: str
) -> None:
    running = await daemon_factory()
    url = URL(f"{running.api_url}/v1/accounts/{raw}/authorize-url", encoded=True)
    async with running.session.post(url, headers=running.headers) as answer:
        assert answer.status == 400
        body = await answer.json()
    assert body["error"] == "invalid_account_id"
    assert body["detail"] == f"account_id must be {ACCOUNT_ID_RULE}"
    assert db_rows(running, "SELECT * FROM oauth_states") == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/accounts/x/../acme/authorize-url",
        "/v1/accounts/a/b/authorize-url",
        "/v1/accounts//authorize-url",
        "/v1/accounts/acme/authorize-url/",
    ],
)
async def test_authorize_url_path_tricks_match_nothing(
    daemon_factory: StartDaemon, path: str
) -> None:
    running = await daemon_factory()
    url = URL(running.api_url + path, encoded=True)
    async with running.session.post(url, headers=running.headers) as answer:
        assert answer.status == 404
        assert (await answer.json())["error"] == "not_found"
    assert db_rows(running, "SELECT * FROM oauth_states") == []


@pytest.mark.parametrize("account_id", ["a" * 128, "tenant-1.eu:acme@x_y", "7"])
async def test_authorize_url_accepts_the_documented_form(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, account_id: str
) -> None:
    running = await daemon_factory()
    assert_says(await browse(await callback_url(running, account_id)), 200, "connected")
    assert account_row(running, account_id)["status"] == "active"


async def test_authorize_url_needs_the_api_key(daemon_factory: StartDaemon) -> None:
    running = await daemon_factory()
    status, body = await running.api(
        "POST", "/v1/accounts/acme/authorize-url", headers={"Authorization": "Bearer wrong"}
    )
    assert (status, body["error"]) == (401, "unauthorized")
    assert db_rows(running, "SELECT * FROM oauth_states") == []


@pytest.mark.parametrize(
    "path",
    [
        "/accounts/oauth2_callback/",
        "/accounts/./oauth2_callback",
        "/accounts/x/../oauth2_callback",
        "//accounts/oauth2_callback",
        "/ACCOUNTS/oauth2_callback",
        "/accounts%2Foauth2_callback",
        "/accounts/oauth2_callback;x=1",
        "/",
    ],
)
async def test_callback_path_tricks_match_nothing(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, path: str
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    tricked = URL.build(
        scheme="http",
        host=back.host or "",
        port=back.port,
        path=path,
        query_string=back.raw_query_string,
        encoded=True,
    )
    page = await browse(tricked)
    assert page.status == 404
    assert_not_shown(page, back.query["code"])
    assert token_calls(simulator) == []
    assert_says(await browse(back), 200, "QuickBooks is connected")


async def test_the_callback_answers_only_get(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    for method in ("POST", "PUT", "DELETE"):
        assert (await browse(back, method)).status == 405
    assert token_calls(simulator) == []
    assert_says(await browse(back), 200, "QuickBooks is connected")


# -- a double-fired callback -------------------------------------------------------------


async def test_a_double_fired_callback_exchanges_the_code_once(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    # Intuit is slow, so the second request arrives while the first is exchanging.
    simulator.settings.update(latency=0.5)

    pages = await asyncio.gather(browse(back), browse(back))
    for page in pages:
        assert_says(page, 200, "QuickBooks is connected")
    simulator.settings.update(latency=0.0)
    assert_says(await browse(back), 200, "QuickBooks is connected")  # and once more, later

    assert len(token_calls(simulator)) == 1
    assert account_row(running, "acme")["version"] == 1
    # A second exchange would have killed the connection (kill_on_code_reuse).
    account = await running.services.storage.load("acme")
    assert account.access_token is not None
    assert simulator.is_access_token_valid(account.access_token)
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    assert token["access_token"] == account.access_token


async def test_a_double_fired_failing_callback_shows_the_failure_twice(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    simulator.settings.update(latency=1.0)
    simulator.inject("503")

    pages = await asyncio.gather(browse(back), browse(back))
    for page in pages:
        assert_says(page, 502, "Intuit could not be reached")
    assert len(token_calls(simulator)) == 1
    assert account_count(running) == 0


# -- restarts and reconnects -------------------------------------------------------------


async def start_again(old: RunningDaemon) -> RunningDaemon:
    """A new daemon process-alike on the same config file, data and ports."""
    return await run_daemon(
        old.config_path,
        old.simulator,
        api_key=old.api_key,
        encryption_key=old.encryption_key,
    )


async def test_a_restart_between_authorize_url_and_callback_still_connects(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    first = await daemon_factory()
    url = await authorize_url(first, "acme")
    await first.shutdown()

    second = await start_again(first)
    try:
        assert second.callback_url == first.callback_url
        page = await browse(await consent(url))
        assert_says(page, 200, "QuickBooks is connected")
        assert len(exchanges(simulator)) == 1
        assert account_row(second, "acme")["status"] == "active"
        assert await next_refresh(second.services, "acme") is not None
        status, token = await second.api("GET", "/v1/accounts/acme/token")
        assert status == 200
        assert simulator.is_access_token_valid(token["access_token"])
    finally:
        await second.shutdown()


async def test_reconnecting_after_needs_reconnect_replaces_the_tokens(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    first_back = await callback_url(running, "acme")
    assert_says(await browse(first_back), 200, "QuickBooks is connected")
    old = await running.services.storage.load("acme")
    assert old.refresh_token is not None

    simulator.invalidate(old.refresh_token)  # the user disconnected inside QuickBooks
    status, body = await running.api("POST", "/v1/accounts/acme/refresh")
    assert (status, body["error"]) == (409, "needs_reconnect")
    dead = account_row(running, "acme")
    assert dead["status"] == "needs_reconnect"
    assert await next_refresh(running.services, "acme") is None
    status, body = await running.api("GET", "/v1/accounts/acme/token")
    assert (status, body["error"]) == (409, "needs_reconnect")

    assert old.realm_id is not None
    simulator.choose_realm(old.realm_id)  # the user reconnects the same company
    second_back = await callback_url(running, "acme")
    assert_says(await browse(second_back), 200, "QuickBooks is connected")

    row = account_row(running, "acme")
    assert row["status"] == "active"
    assert (row["failure_count"], row["last_error"]) == (0, None)
    assert row["version"] > dead["version"]
    assert row["id"] == dead["id"]
    assert row["created_at"] == dead["created_at"]
    assert account_count(running) == 1
    new = await running.services.storage.load("acme")
    assert new.refresh_token not in (None, old.refresh_token)
    assert new.realm_id == second_back.query["realmId"]
    assert await next_refresh(running.services, "acme") == new.reconnect_token_at
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    assert token["access_token"] == new.access_token
    assert simulator.is_access_token_valid(token["access_token"])


# -- nothing secret in pages or logs ------------------------------------------------------


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    return stream  # the autouse fixture in conftest resets logging afterwards


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_logs_never_carry_a_code_state_or_token(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, log_stream: io.StringIO
) -> None:
    running = await daemon_factory()
    secrets_seen: list[str] = [running.api_key, running.encryption_key]
    secrets_seen.append(simulator.settings.client_secret)

    connected = await callback_url(running, "acme")
    simulator.settings.update(latency=0.3)
    await asyncio.gather(browse(connected), browse(connected))
    simulator.settings.update(latency=0.0)
    simulator.deny_next_authorization()
    denied = await callback_url(running, "beta")
    await browse(denied)
    failed = await callback_url(running, "gamma")
    simulator.inject("invalid_grant")
    assert_says(await browse(failed), 400, "Intuit refused")
    await browse(with_query(failed, code=None))
    status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 200

    account = await running.services.storage.load("acme")
    assert account.access_token
    assert account.refresh_token
    secrets_seen += [account.access_token, account.refresh_token]
    secrets_seen += [e.issued_refresh_token or "" for e in simulator.request_log]
    for url in (connected, denied, failed):
        secrets_seen.append(url.query["state"])
    secrets_seen += [connected.query["code"], failed.query["code"]]

    text = log_stream.getvalue()
    for secret in filter(None, secrets_seen):
        assert secret not in text

    events = log_events(log_stream)
    names = [e["event"] for e in events]
    assert names.count("connect.started") == 3
    [failure] = [e for e in events if e["event"] == "connect.exchange_failed"]
    assert failure["account_id"] == "gamma"
    [faulted] = [e for e in simulator.request_log if e.fault == "invalid_grant"]
    assert failure["intuit_tid"] == faulted.intuit_tid
    assert any(e["event"] == "connect.denied" and e["account_id"] == "beta" for e in events)
    # The access log shows the callback path, never its query.
    requests = [e for e in events if e["event"] == "http.request_served"]
    assert any(e["path"] == running.config.callback.path for e in requests)


def test_the_bad_account_ids_here_really_are_refused() -> None:
    """Keeps the parametrized list honest: each raw id decodes to something invalid."""
    for raw in BAD_ACCOUNT_IDS:
        assert not valid_account_id(unquote(raw)), raw
