"""The connect flow bound end to end (issue 11, item 4), over real HTTP on loopback.

A real daemon (tests.harness) against the real simulator; the browser is a
plain aiohttp client (tests.engine.test_connect), so a test can forge what a
browser can forge: the ``realmId``, the ``state``, the ``code``. What is
checked is what a user or an operator would check: the page, the rows, the
account JSON, the simulator's request log (CompanyInfo, revocations) and the
daemon's events.

- the callback's company is confirmed with Intuit (CompanyInfo) before it is
  stored; a refused one is revoked, a transient failure leaves the account
  unverified until a refresh confirms it;
- one company, one account id; an account keeps its company unless asked;
- PKCE S256, its verifier encrypted in the state's row;
- states kept as hashes; a used state answers only its own first callback;
  pending states per account are capped.
"""

from __future__ import annotations

import io
import json
import secrets
from typing import Any

import pytest
from yarl import URL

from qbo_daemon.config.load import load_config
from qbo_daemon.intuit.pkce import challenge
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator, RequestLogEntry
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.schema import sha256_hex
from qbo_daemon.store.states import MAX_PENDING
from tests.conftest import StartDaemon
from tests.engine.test_connect import (
    account_count,
    account_row,
    assert_not_shown,
    assert_says,
    authorize_url,
    browse,
    callback_url,
    consent,
    database_bytes,
    db_rows,
    exchanges,
    state_of,
    with_query,
)
from tests.harness import RunningDaemon, next_refresh

# The companies a forged callback may name: another connected one, or one made up.
FORGED = ["another-company", "made-up"]


@pytest.fixture
def events_log() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    return stream  # the autouse fixture in tests/conftest.py resets logging afterwards


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == name]


def calls(simulator: IntuitSimulator, endpoint: str) -> list[RequestLogEntry]:
    return [e for e in simulator.request_log if e.endpoint == endpoint]


async def account_json(running: RunningDaemon, account_id: str) -> dict[str, Any]:
    status, body = await running.api("GET", f"/v1/accounts/{account_id}")
    assert status == 200, body
    return dict(body)


def forged_realm(simulator: IntuitSimulator, kind: str) -> str:
    if kind == "another-company":
        return str(simulator.grant()["realm_id"])
    return str(secrets.randbelow(10**18) + 10**18)


# -- the company is confirmed with Intuit --------------------------------------------------


@pytest.mark.parametrize("kind", FORGED)
async def test_a_forged_realm_is_refused_nothing_is_stored_and_the_new_token_is_revoked(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, kind: str
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    forged = with_query(back, realmId=forged_realm(simulator, kind))

    page = await browse(forged)

    assert_says(page, 400, "QuickBooks was not connected", "Intuit did not confirm")
    assert_not_shown(page, back.query["code"], back.query["realmId"], forged.query["realmId"])
    assert account_count(running) == 0
    [exchange] = exchanges(simulator)
    assert exchange.status == 200
    [check] = calls(simulator, "companyinfo")
    assert (check.status, check.realm_id) == (403, forged.query["realmId"])
    # The tokens Intuit issued for the real company are revoked, not left alive.
    [revoke] = calls(simulator, "revoke")
    assert revoke.status == 200
    assert revoke.presented_refresh_token == exchange.issued_refresh_token
    [state] = db_rows(running, "SELECT used_at, outcome FROM oauth_states")
    assert state["used_at"] is not None
    assert state["outcome"] == "realm_refused"
    # Fired again, the browser is told the same; nothing more is exchanged or revoked.
    assert_says(await browse(forged), 400, "Intuit did not confirm")
    assert len(exchanges(simulator)) == 1
    assert len(calls(simulator, "revoke")) == 1
    assert account_count(running) == 0


# ("reset" is no such failure: aiohttp sends an idempotent GET again on a dropped connection.)
@pytest.mark.parametrize("fault", ["503", "429", "500", "502_html", "malformed"])
async def test_a_transient_check_stores_the_account_unverified_until_a_refresh_confirms_it(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, fault: str
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    simulator.inject(fault, endpoint="companyinfo", retry_after=0)

    assert_says(await browse(back), 200, "QuickBooks is connected")

    row = account_row(running, "acme")
    assert (row["status"], row["realm_verified"]) == ("active", 0)
    shown = await account_json(running, "acme")
    assert shown["realm_verified"] is False
    assert shown["realm_id"] == back.query["realmId"]
    assert calls(simulator, "revoke") == []
    status, _ = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200  # the connection is usable meanwhile

    status, refreshed = await running.api("POST", "/v1/accounts/acme/refresh")

    assert status == 200, refreshed
    assert refreshed["realm_verified"] is True
    assert (await account_json(running, "acme"))["realm_verified"] is True
    assert account_row(running, "acme")["realm_verified"] == 1
    assert [c.status for c in calls(simulator, "companyinfo")][-1] == 200


async def test_a_check_that_fails_again_at_refresh_stays_unverified(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    simulator.inject("503", 2, endpoint="companyinfo", retry_after=0)
    assert_says(await browse(back), 200, "QuickBooks is connected")

    status, refreshed = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 200
    assert (refreshed["status"], refreshed["realm_verified"]) == ("active", False)

    status, refreshed = await running.api("POST", "/v1/accounts/acme/refresh")
    assert refreshed["realm_verified"] is True
    assert len(calls(simulator, "companyinfo")) == 3


async def test_a_verified_account_is_not_checked_again(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    assert_says(await browse(await callback_url(running, "acme")), 200, "connected")
    for _ in range(2):
        status, _ = await running.api("POST", "/v1/accounts/acme/refresh")
        assert status == 200
    assert len(calls(simulator, "companyinfo")) == 1


async def test_a_realm_refused_at_refresh_needs_reconnect_with_a_clear_error(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, events_log: io.StringIO
) -> None:
    """A forged realm slipped in while CompanyInfo was failing is caught by the next refresh."""
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    forged = with_query(back, realmId=forged_realm(simulator, "another-company"))
    simulator.inject("503", endpoint="companyinfo", retry_after=0)
    assert_says(await browse(forged), 200, "QuickBooks is connected")
    assert account_row(running, "acme")["realm_verified"] == 0

    status, body = await running.api("POST", "/v1/accounts/acme/refresh")

    assert (status, body["error"]) == (409, "needs_reconnect")
    assert "did not confirm" in body["detail"]
    row = account_row(running, "acme")
    assert row["status"] == "needs_reconnect"
    assert row["realm_verified"] == 0
    assert "Intuit did not confirm" in row["last_error"]
    assert "CompanyInfo answered HTTP 403" in row["last_error"]
    assert await next_refresh(running.services, "acme") is None
    status, body = await running.api("GET", "/v1/accounts/acme/token")
    assert (status, body["error"]) == (409, "needs_reconnect")
    [event] = events(events_log, "account.reconnect_needed")
    assert event["account_id"] == "acme"
    assert "Intuit did not confirm" in event["reason"]
    # The tokens (of a company the app does not know) are revoked at Intuit.
    refreshed = [e for e in calls(simulator, "token") if e.grant_type == "refresh_token"]
    [revoke] = calls(simulator, "revoke")
    assert revoke.status == 200
    assert revoke.presented_refresh_token == refreshed[-1].issued_refresh_token
    [attempt] = [a for a in await running.services.status.attempts("acme")][:1]
    assert attempt.outcome == "realm_refused"


# -- one company, one account id -------------------------------------------------------------


async def test_a_company_connected_under_another_account_id_is_refused(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    first = await callback_url(running, "acme")
    assert_says(await browse(first), 200, "QuickBooks is connected")
    acme = await running.services.storage.load("acme")

    simulator.choose_realm(first.query["realmId"])  # the same company, for another tenant
    second = await callback_url(running, "beta")
    page = await browse(second)

    assert_says(page, 400, "already connected to another account")
    assert "acme" not in page.text  # the page does not tell who holds the company
    assert [r["account_id"] for r in db_rows(running, "SELECT * FROM accounts")] == ["acme"]
    [state] = db_rows(running, "SELECT outcome FROM oauth_states WHERE account_id = 'beta'")
    assert state["outcome"] == "realm_shared"
    # acme's connection is untouched: not revoked, its token still good.
    assert calls(simulator, "revoke") == []
    assert acme.access_token is not None
    assert simulator.is_access_token_valid(acme.access_token)
    assert account_row(running, "acme")["version"] == acme.version
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert (status, token["access_token"]) == (200, acme.access_token)


async def test_a_disconnected_account_does_not_hold_its_company(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    first = await callback_url(running, "acme")
    assert_says(await browse(first), 200, "QuickBooks is connected")
    status, _ = await running.api("DELETE", "/v1/accounts/acme")
    assert status == 200

    simulator.choose_realm(first.query["realmId"])
    assert_says(await browse(await callback_url(running, "beta")), 200, "QuickBooks is connected")
    beta = await running.services.storage.load("beta")
    assert beta.realm_id == first.query["realmId"]


async def test_sharing_a_company_can_be_allowed_by_configuration(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    first = await callback_url(running, "acme")
    assert_says(await browse(first), 200, "QuickBooks is connected")

    # [callback] allow_shared_realm = true, applied by a reload (SIGHUP).
    text = running.config_path.read_text(encoding="utf-8")
    shared = text.replace("[callback]\n", "[callback]\nallow_shared_realm = true\n", 1)
    assert shared != text
    running.config_path.write_text(shared, encoding="utf-8")
    await running.daemon.reload(load_config(running.config_path, {}))

    simulator.choose_realm(first.query["realmId"])
    assert_says(await browse(await callback_url(running, "beta")), 200, "QuickBooks is connected")
    acme = await running.services.storage.load("acme")
    beta = await running.services.storage.load("beta")
    assert acme.realm_id == beta.realm_id == first.query["realmId"]
    assert acme.access_token is not None
    assert simulator.is_access_token_valid(acme.access_token)


async def test_reconnecting_to_another_company_is_refused_unless_asked(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, events_log: io.StringIO
) -> None:
    running = await daemon_factory()
    first = await callback_url(running, "acme")
    assert_says(await browse(first), 200, "QuickBooks is connected")
    before = tuple(account_row(running, "acme"))

    # The simulator's next consent is a new company: a plain reconnect is refused.
    other = await callback_url(running, "acme")
    assert other.query["realmId"] != first.query["realmId"]
    page = await browse(other)

    assert_says(page, 400, "already connected to a different QuickBooks company")
    assert tuple(account_row(running, "acme")) == before
    assert events(events_log, "account.realm_changed") == []

    # Asked for, the change is made and announced.
    status, body = await running.api(
        "POST", "/v1/accounts/acme/authorize-url", json={"allow_realm_change": True}
    )
    assert status == 200, body
    moved = await consent(body["url"])
    assert_says(await browse(moved), 200, "QuickBooks is connected")

    account = await running.services.storage.load("acme")
    assert account.realm_id == moved.query["realmId"] != first.query["realmId"]
    assert account.realm_verified
    [event] = events(events_log, "account.realm_changed")
    assert event["account_id"] == "acme"
    assert event["realm_id"] == moved.query["realmId"]
    assert event["previous_realm_id"] == first.query["realmId"]
    [state] = db_rows(
        running,
        "SELECT allow_realm_change FROM oauth_states WHERE outcome = 'connected' "
        "ORDER BY created_at DESC LIMIT 1",
    )
    assert state["allow_realm_change"] == 1


async def test_reconnecting_the_same_company_needs_no_permission(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, events_log: io.StringIO
) -> None:
    running = await daemon_factory()
    first = await callback_url(running, "acme")
    assert_says(await browse(first), 200, "QuickBooks is connected")
    simulator.choose_realm(first.query["realmId"])
    assert_says(await browse(await callback_url(running, "acme")), 200, "QuickBooks is connected")
    assert account_row(running, "acme")["version"] == 2
    assert events(events_log, "account.realm_changed") == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"allow_realm_change": "yes"}, "invalid_field"),
        ({"allow_realm_change": 1}, "invalid_field"),
        ({"allow_realm_changes": True}, "invalid_field"),
        ([True], "invalid_json"),
    ],
)
async def test_authorize_url_refuses_a_bad_body_and_stores_no_state(
    daemon_factory: StartDaemon, body: Any, error: str
) -> None:
    running = await daemon_factory()
    status, answer = await running.api("POST", "/v1/accounts/acme/authorize-url", json=body)
    assert (status, answer["error"]) == (400, error)
    assert db_rows(running, "SELECT * FROM oauth_states") == []


# -- PKCE ------------------------------------------------------------------------------------


async def test_pkce_challenge_rides_on_the_url_and_its_verifier_is_encrypted_in_the_state_row(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()  # the tests' configuration turns PKCE on
    url = URL(await authorize_url(running, "acme"))
    assert url.query["code_challenge_method"] == "S256"
    [row] = db_rows(running, "SELECT state_hash, code_verifier FROM oauth_states")
    stored = row["code_verifier"]
    assert stored.startswith("v1.")
    cipher = Cipher([EncryptionKey.from_text(running.encryption_key)])
    verifier = cipher.decrypt(
        stored, table="oauth_states", column="code_verifier", row_key=row["state_hash"]
    )
    assert 43 <= len(verifier) <= 128
    assert challenge(verifier) == url.query["code_challenge"]
    assert verifier.encode() not in database_bytes(running)

    back = await consent(str(url))
    assert_says(await browse(back), 200, "QuickBooks is connected")
    # The simulator traded the code only against the verifier.
    [exchange] = exchanges(simulator)
    assert exchange.status == 200


async def test_without_its_verifier_the_code_is_refused(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    """Proof the exchange carries the verifier: take it out of the row and Intuit refuses."""
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    db = __import__("sqlite3").connect(running.database)
    try:
        with db:
            db.execute("UPDATE oauth_states SET code_verifier = NULL")
    finally:
        db.close()
    assert_says(await browse(back), 400, "Intuit refused the sign-in code")
    [exchange] = exchanges(simulator)
    assert (exchange.status, exchange.error) == (400, "invalid_grant")
    assert account_count(running) == 0


async def test_pkce_is_off_when_not_configured(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory(pkce="false")
    url = URL(await authorize_url(running, "acme"))
    assert "code_challenge" not in url.query
    assert "code_challenge_method" not in url.query
    [row] = db_rows(running, "SELECT code_verifier FROM oauth_states")
    assert row["code_verifier"] is None
    assert_says(await browse(await consent(str(url))), 200, "QuickBooks is connected")


# -- states ----------------------------------------------------------------------------------


async def test_states_are_stored_only_as_sha256_hashes(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    pending = state_of(await authorize_url(running, "beta"))
    assert_says(await browse(back), 200, "QuickBooks is connected")

    raw = database_bytes(running)
    for state in (state_of(back), pending):
        assert state.encode() not in raw
    hashes = {r["state_hash"] for r in db_rows(running, "SELECT state_hash FROM oauth_states")}
    assert hashes == {sha256_hex(state_of(back)), sha256_hex(pending)}
    assert back.query["code"].encode() not in raw


async def test_a_used_state_answers_only_its_own_first_callback(
    daemon_factory: StartDaemon, simulator: IntuitSimulator
) -> None:
    running = await daemon_factory()
    back = await callback_url(running, "acme")
    assert_says(await browse(back), 200, "QuickBooks is connected")
    version = account_row(running, "acme")["version"]

    # The same callback again: the first outcome. Anything else with this state: 400.
    assert_says(await browse(back), 200, "QuickBooks is connected")
    for other in (
        with_query(back, code="sim-ac-" + secrets.token_urlsafe(24)),
        with_query(back, code=None, realmId=None, error="access_denied"),
    ):
        page = await browse(other)
        assert_says(page, 400, "already been used")
    assert len(exchanges(simulator)) == 1
    assert account_row(running, "acme")["version"] == version

    # A declined state, fired again with a code, is refused too.
    simulator.deny_next_authorization()
    denied = await callback_url(running, "beta")
    assert_says(await browse(denied), 400, "QuickBooks was not connected")
    assert_says(await browse(denied), 400, "QuickBooks was not connected")
    page = await browse(with_query(denied, error=None, code="sim-ac-x", realmId="123"))
    assert_says(page, 400, "already been used")
    assert len(exchanges(simulator)) == 1


async def test_pending_states_per_account_are_capped_oldest_dropped(
    daemon_factory: StartDaemon, simulator: IntuitSimulator, events_log: io.StringIO
) -> None:
    running = await daemon_factory()
    urls = [await authorize_url(running, "acme") for _ in range(MAX_PENDING + 2)]
    other = await authorize_url(running, "beta")

    rows = db_rows(running, "SELECT state_hash FROM oauth_states WHERE account_id = 'acme'")
    assert len(rows) == MAX_PENDING
    assert {r["state_hash"] for r in rows} == {sha256_hex(state_of(u)) for u in urls[2:]}
    assert sum(e["dropped"] for e in events(events_log, "connect.states_dropped")) == 2

    for dropped in urls[:2]:
        assert_says(await browse(await consent(dropped)), 400, "not known")
    assert_says(await browse(await consent(urls[-1])), 200, "QuickBooks is connected")
    assert_says(await browse(await consent(other)), 200, "QuickBooks is connected")
