"""The Intuit simulator, driven over real HTTP as the daemon and the demo drive it."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from yarl import URL

from qbo_daemon.simulator.app import (
    FAULT_KINDS,
    MAX_BULK_GRANTS,
    RAW_KIND,
    IntuitSimulator,
    RawAnswer,
    SimulatorSettings,
    serve_simulator,
)
from tests.manual_clock import ManualClock
from tests.simulator.conftest import START

REDIRECT = "http://localhost:3000/accounts/oauth2_callback"
SCOPE = "com.intuit.quickbooks.accounting"
FRESH_REFRESH_LIFE = 8_726_400
FIVE_YEARS = 5 * 365 * 86400
INVALID_RT = {"error": "invalid_grant", "error_description": "Incorrect or invalid refresh token"}


CLIENT_ID = "sim-client-id"
CLIENT_SECRET = "sim-client-secret"


def basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


class Answer:
    """What a client sees of one HTTP answer."""

    def __init__(self, status: int, headers: Mapping[str, str], text: str) -> None:
        self.status = status
        self.headers = headers
        self.text = text

    def json(self) -> Any:
        return json.loads(self.text)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    client_timeout: float | None = None,
    **kwargs: Any,
) -> Answer:
    if client_timeout is not None:
        kwargs["timeout"] = aiohttp.ClientTimeout(total=client_timeout)
    async with http.request(method, url, allow_redirects=False, **kwargs) as resp:
        return Answer(resp.status, resp.headers, await resp.text())


async def authorize(
    http: aiohttp.ClientSession, sim: IntuitSimulator, **overrides: str | None
) -> Answer:
    params: dict[str, str | None] = {
        "client_id": "sim-client-id",
        "response_type": "code",
        "scope": SCOPE,
        "redirect_uri": REDIRECT,
        "state": "st-123",
        **overrides,
    }
    query = {k: v for k, v in params.items() if v is not None}
    return await call(http, "GET", sim.authorization_endpoint, params=query)


async def token(
    http: aiohttp.ClientSession,
    sim: IntuitSimulator,
    data: dict[str, str],
    *,
    auth: str | None = None,
    hard: bool = False,
    client_timeout: float | None = None,
) -> Answer:
    headers = {"Authorization": auth or basic(), "Accept": "application/json"}
    if hard:
        headers["x-include-refresh-token-hard-expires-in"] = "true"
    return await call(
        http, "POST", sim.token_endpoint, data=data, headers=headers, client_timeout=client_timeout
    )


async def refresh(
    http: aiohttp.ClientSession, sim: IntuitSimulator, refresh_token: str, *, hard: bool = False
) -> Answer:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    return await token(http, sim, data, hard=hard)


async def revoke(
    http: aiohttp.ClientSession, sim: IntuitSimulator, value: str, *, auth: str | None = None
) -> Answer:
    headers = {"Authorization": auth or basic(), "Accept": "application/json"}
    return await call(http, "POST", sim.revocation_endpoint, json={"token": value}, headers=headers)


def callback_query(answer: Answer) -> dict[str, str]:
    assert answer.status == 302
    location = URL(answer.headers["Location"])
    assert str(location.with_query(None)) == REDIRECT
    return dict(location.query)


async def connect(http: aiohttp.ClientSession, sim: IntuitSimulator) -> dict[str, Any]:
    """The whole browser flow: authorize, then exchange the code."""
    query = callback_query(await authorize(http, sim))
    data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
    answer = await token(http, sim, data)
    assert answer.status == 200
    body: dict[str, Any] = answer.json()
    body["realm_id"] = query["realmId"]
    return body


# -- authorization -------------------------------------------------------------


async def test_authorization_redirects_back_with_code_state_and_realm(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    answer = await authorize(http, sim)
    query = callback_query(answer)
    assert set(query) == {"code", "state", "realmId"}
    assert query["state"] == "st-123"
    assert query["realmId"].isdigit()
    assert answer.headers["intuit_tid"]

    other = callback_query(await authorize(http, sim))
    assert other["code"] != query["code"]
    assert other["realmId"] != query["realmId"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"client_id": "someone-else"}, "client_id"),
        ({"client_id": None}, "client_id"),
        ({"response_type": "token"}, "response_type"),
        ({"scope": ""}, "scope"),
        ({"scope": None}, "scope"),
        ({"redirect_uri": None}, "redirect_uri"),
        ({"redirect_uri": "/relative/callback"}, "redirect_uri"),
    ],
)
async def test_authorization_rejects_a_bad_request_with_a_page(
    http: aiohttp.ClientSession,
    sim: IntuitSimulator,
    overrides: dict[str, str | None],
    reason: str,
) -> None:
    answer = await authorize(http, sim, **overrides)
    assert answer.status == 400
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert reason in answer.text
    assert "Location" not in answer.headers


async def test_denied_authorization_redirects_with_access_denied_once(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.deny_next_authorization()
    query = callback_query(await authorize(http, sim))
    assert query == {"error": "access_denied", "state": "st-123"}

    assert "code" in callback_query(await authorize(http, sim))


# -- code exchange ---------------------------------------------------------------


async def test_code_exchange_answers_in_intuits_shape(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    query = callback_query(await authorize(http, sim))
    data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
    answer = await token(http, sim, data)

    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json()
    assert set(body) == {
        "access_token",
        "refresh_token",
        "token_type",
        "expires_in",
        "x_refresh_token_expires_in",
    }
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert body["x_refresh_token_expires_in"] == FRESH_REFRESH_LIFE
    assert body["access_token"].startswith("sim-at-")
    assert body["refresh_token"].startswith("sim-rt-")
    assert sim.is_access_token_valid(body["access_token"])


async def test_a_code_is_single_use_and_a_replay_kills_its_connection(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    query = callback_query(await authorize(http, sim))
    data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
    first = await token(http, sim, data)
    assert first.status == 200

    replay = await token(http, sim, data)
    assert replay.status == 400
    assert replay.json() == {"error": "invalid_grant"}
    # A double-fired callback can cost the connection (oauth-jsclient issue 173).
    dead = await refresh(http, sim, first.json()["refresh_token"])
    assert dead.status == 400
    assert dead.json()["error"] == "invalid_grant"


async def test_an_access_token_lives_expires_in_seconds(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    sim.settings.expires_in = 60
    tokens = await connect(http, sim)
    assert tokens["expires_in"] == 60
    clock.advance(59)
    assert sim.is_access_token_valid(tokens["access_token"])
    clock.advance(1)
    assert not sim.is_access_token_valid(tokens["access_token"])
    # A dead access token is no dead connection: the refresh token still works.
    assert (await refresh(http, sim, tokens["refresh_token"])).status == 200


async def test_a_replayed_code_can_spare_the_connection(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.settings.kill_on_code_reuse = False
    query = callback_query(await authorize(http, sim))
    data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
    first = await token(http, sim, data)
    assert (await token(http, sim, data)).status == 400
    assert (await refresh(http, sim, first.json()["refresh_token"])).status == 200


async def test_a_code_expires_after_its_lifetime(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    query = callback_query(await authorize(http, sim))
    clock.advance(600)
    data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
    answer = await token(http, sim, data)
    assert answer.status == 400
    assert answer.json() == {"error": "invalid_grant"}


async def test_a_code_is_bound_to_its_redirect_uri(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    query = callback_query(await authorize(http, sim))
    data = {"grant_type": "authorization_code", "code": query["code"]}
    wrong = await token(http, sim, {**data, "redirect_uri": "http://evil.example/cb"})
    assert wrong.status == 400
    assert wrong.json() == {"error": "invalid_grant"}
    assert (await token(http, sim, {**data, "redirect_uri": REDIRECT})).status == 200


async def test_an_unknown_code_is_invalid_grant(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    data = {"grant_type": "authorization_code", "code": "nope", "redirect_uri": REDIRECT}
    answer = await token(http, sim, data)
    assert (answer.status, answer.json()) == (400, {"error": "invalid_grant"})


# -- refresh and rotation -----------------------------------------------------------


async def test_refresh_keeps_the_value_until_rotate_after_then_kills_the_old_one(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    tokens = await connect(http, sim)
    first_rt = tokens["refresh_token"]

    clock.advance(100)
    same = (await refresh(http, sim, first_rt)).json()
    assert same["refresh_token"] == first_rt
    assert same["access_token"] != tokens["access_token"]
    assert same["x_refresh_token_expires_in"] == FRESH_REFRESH_LIFE - 100

    clock.advance(86_400 - 100)
    rotated = (await refresh(http, sim, first_rt)).json()
    assert rotated["refresh_token"] != first_rt
    assert rotated["refresh_token"].startswith("sim-rt-")
    assert rotated["x_refresh_token_expires_in"] == FRESH_REFRESH_LIFE

    old = await refresh(http, sim, first_rt)
    assert (old.status, old.json()) == (400, INVALID_RT)
    assert (await refresh(http, sim, rotated["refresh_token"])).status == 200


async def test_rotate_after_zero_rotates_on_every_refresh(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.settings.rotate_after = 0
    current = (await connect(http, sim))["refresh_token"]
    seen = {current}
    for _ in range(3):
        answer = await refresh(http, sim, current)
        assert answer.status == 200
        new = answer.json()["refresh_token"]
        assert new not in seen
        stale = await refresh(http, sim, current)
        assert (stale.status, stale.json()) == (400, INVALID_RT)
        seen.add(new)
        current = new


async def test_an_unused_refresh_token_expires(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    sim.settings.refresh_expires_in = 1000
    tokens = await connect(http, sim)
    assert tokens["x_refresh_token_expires_in"] == 1000
    clock.advance(1000)
    answer = await refresh(http, sim, tokens["refresh_token"])
    assert (answer.status, answer.json()["error"]) == (400, "invalid_grant")


async def test_hard_expiry_is_sent_only_when_asked_for(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    rt = (await connect(http, sim))["refresh_token"]
    clock.advance(500)

    plain = (await refresh(http, sim, rt)).json()
    assert "x_refresh_token_hard_expires_in" not in plain
    asked = (await refresh(http, sim, rt, hard=True)).json()
    # Counted from the first authorization, not from this refresh.
    assert asked["x_refresh_token_hard_expires_in"] == FIVE_YEARS - 500

    sim.settings.hard_expires_in = None
    assert "x_refresh_token_hard_expires_in" not in (await refresh(http, sim, rt, hard=True)).json()


async def test_hard_expiry_caps_the_refresh_token_and_then_ends_the_connection(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    sim.settings.hard_expires_in = 300
    tokens = await connect(http, sim)
    assert tokens["x_refresh_token_expires_in"] == 300
    clock.advance(300)
    answer = await refresh(http, sim, tokens["refresh_token"], hard=True)
    assert (answer.status, answer.json()["error"]) == (400, "invalid_grant")


# -- client authentication and request checks ----------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        basic(secret="wrong"),
        basic(client_id="other"),
        "Bearer sim-client-secret",
        "Basic not-base64!!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "",
    ],
)
async def test_bad_client_credentials_are_invalid_client(
    http: aiohttp.ClientSession, sim: IntuitSimulator, auth: str
) -> None:
    rt = sim.grant()["refresh_token"]
    headers = {"Authorization": auth} if auth else {}
    answer = await call(
        http,
        "POST",
        sim.token_endpoint,
        data={"grant_type": "refresh_token", "refresh_token": rt},
        headers=headers,
    )
    assert (answer.status, answer.json()) == (401, {"error": "invalid_client"})
    assert (await revoke(http, sim, rt, auth=auth or "Basic")).status == 401
    assert (await refresh(http, sim, rt)).status == 200


async def test_basic_scheme_is_case_insensitive(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    data = {"grant_type": "refresh_token", "refresh_token": rt}
    answer = await token(http, sim, data, auth="basic " + basic().split()[1])
    assert answer.status == 200


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({"grant_type": "authorization_code", "code": "x"}, "invalid_request"),
    ],
)
async def test_malformed_token_requests(
    http: aiohttp.ClientSession, sim: IntuitSimulator, data: dict[str, str], error: str
) -> None:
    answer = await token(http, sim, data)
    assert (answer.status, answer.json()) == (400, {"error": error})


# -- revoke and invalidate ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["refresh_token", "access_token"])
async def test_revoke_ends_the_whole_connection(
    http: aiohttp.ClientSession, sim: IntuitSimulator, which: str
) -> None:
    tokens = await connect(http, sim)
    answer = await revoke(http, sim, tokens[which])
    assert answer.status == 200
    assert answer.headers["intuit_tid"]

    dead = await refresh(http, sim, tokens["refresh_token"])
    assert (dead.status, dead.json()["error"]) == (400, "invalid_grant")
    assert not sim.is_access_token_valid(tokens["access_token"])
    # Intuit answers 400 for a token that is already revoked.
    assert (await revoke(http, sim, tokens[which])).status == 400


async def test_revoke_of_an_unknown_token_is_400(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    answer = await revoke(http, sim, "sim-rt-never-issued")
    assert answer.status == 400
    missing = await call(
        http, "POST", sim.revocation_endpoint, json={}, headers={"Authorization": basic()}
    )
    assert missing.status == 400


async def test_invalidate_is_a_user_disconnecting_inside_quickbooks(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    tokens = await connect(http, sim)
    sim.invalidate(tokens["refresh_token"])
    answer = await refresh(http, sim, tokens["refresh_token"])
    assert answer.status == 400
    assert answer.json() == {"error": "invalid_grant", "error_description": "Token invalid"}
    with pytest.raises(KeyError):
        sim.invalidate("sim-rt-never-issued")


async def test_grant_mints_a_working_connection(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    answer = sim.grant("4620816365178372290")
    assert answer["realm_id"] == "4620816365178372290"
    assert answer["x_refresh_token_hard_expires_in"] == FIVE_YEARS
    assert sim.grant()["realm_id"].isdigit()
    assert (await refresh(http, sim, answer["refresh_token"])).status == 200


# -- faults -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "content_type"),
    [
        ("500", 500, "application/json"),
        ("502_html", 502, "text/html"),
        ("html", 502, "text/html"),
        ("503", 503, "text/html"),
        ("429", 429, "application/json"),
        ("malformed", 200, "application/json"),
        ("no_token", 200, "application/json"),
        ("invalid_grant", 400, "application/json"),
        ("invalid_client", 401, "application/json"),
    ],
)
async def test_an_answered_fault_changes_nothing(
    http: aiohttp.ClientSession,
    sim: IntuitSimulator,
    kind: str,
    status: int,
    content_type: str,
) -> None:
    sim.settings.rotate_after = 0  # so that a rotation would show
    rt = sim.grant()["refresh_token"]
    sim.inject(kind)

    faulted = await refresh(http, sim, rt)
    assert faulted.status == status
    assert faulted.headers["Content-Type"].startswith(content_type)
    assert faulted.headers["intuit_tid"]
    if kind == "malformed":
        with pytest.raises(ValueError, match="Unterminated"):
            faulted.json()
    elif kind == "no_token":
        assert "access_token" not in faulted.json()
    elif kind in ("502_html", "html", "503"):
        assert faulted.text.startswith("<html>")
        assert "nginx" in faulted.text
    elif kind == "invalid_grant":
        assert faulted.json() == INVALID_RT
    elif kind == "invalid_client":
        assert faulted.json() == {"error": "invalid_client"}

    # The presented token is still the live one: the fault rotated nothing.
    after = await refresh(http, sim, rt)
    assert after.status == 200
    assert after.json()["refresh_token"] != rt
    assert sim.request_log[-2].fault == kind


@pytest.mark.parametrize(("kind", "status"), [("503", 503), ("429", 429)])
async def test_retry_after_is_sent_with_503_and_429(
    http: aiohttp.ClientSession, sim: IntuitSimulator, kind: str, status: int
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject(kind)
    sim.inject(kind, retry_after=7)
    sim.inject(kind, retry_after=0.5)
    values = []
    for _ in range(3):
        answer = await refresh(http, sim, rt)
        assert answer.status == status
        values.append(answer.headers["Retry-After"])
    assert values == ["2", "7", "0.5"]


async def test_hang_holds_the_call_until_the_client_gives_up(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject("hang")
    data = {"grant_type": "refresh_token", "refresh_token": rt}
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await token(http, sim, data, client_timeout=0.3)
    assert time.monotonic() - started < 2
    assert (await refresh(http, sim, rt)).status == 200
    assert sim.request_log[0].fault == "hang"
    assert sim.request_log[0].status == 0


async def test_close_releases_a_hung_call(clock: ManualClock) -> None:
    sim = IntuitSimulator(clock=clock)
    await sim.start()
    sim.inject("hang")
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(refresh(http, sim, sim.grant()["refresh_token"]))
        for _ in range(500):  # until the simulator holds the call
            if sim.request_log:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await sim.close()
        assert time.monotonic() - started < 1.5
        with pytest.raises(aiohttp.ClientConnectionError):
            await pending


async def test_reset_closes_the_connection_without_an_answer(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject("reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await refresh(http, sim, rt)
    assert (await refresh(http, sim, rt)).status == 200
    assert (sim.request_log[0].fault, sim.request_log[0].status) == ("reset", 0)


async def test_a_fault_hits_the_next_count_calls_of_its_endpoint_only(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject("500", count=2)
    sim.inject("502_html", endpoint="revoke")
    statuses = [(await refresh(http, sim, rt)).status for _ in range(3)]
    assert statuses == [500, 500, 200]

    assert (await revoke(http, sim, rt)).status == 502
    assert (await refresh(http, sim, rt)).status == 200  # the faulted revoke revoked nothing
    assert (await revoke(http, sim, rt)).status == 200


async def test_a_faulted_code_exchange_does_not_use_the_code(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    query = callback_query(await authorize(http, sim))
    data = {"grant_type": "authorization_code", "code": query["code"], "redirect_uri": REDIRECT}
    sim.inject("503")
    assert (await token(http, sim, data)).status == 503
    assert (await token(http, sim, data)).status == 200


async def test_faults_on_the_authorization_endpoint(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.inject("html", endpoint="authorize")
    answer = await authorize(http, sim)
    assert answer.status == 502
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "code" in callback_query(await authorize(http, sim))


def test_inject_rejects_what_it_cannot_do() -> None:
    sim = IntuitSimulator()
    with pytest.raises(ValueError, match="fault kind"):
        sim.inject("teapot")
    with pytest.raises(ValueError, match="endpoint"):
        sim.inject("500", endpoint="userinfo")
    with pytest.raises(ValueError, match="count"):
        sim.inject("500", count=0)
    with pytest.raises(ValueError, match="retry_after"):
        sim.inject("503", retry_after=-1)
    assert sim.stats()["pending_faults"] == {
        "authorize": [],
        "token": [],
        "revoke": [],
        "companyinfo": [],
    }


async def test_a_raw_fault_answers_exactly_what_it_was_given_and_changes_nothing(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    sim.settings.rotate_after = 0  # so that a rotation would show
    rt = sim.grant()["refresh_token"]
    body = '{"access_token":"at","refresh_token":"rt","expires_in":"\u00b2"}'
    answer = RawAnswer.make(
        200, [("Retry-After", "1e12"), ("Retry-After", "7"), ("X-Odd", "caf\u00e9")], body
    )
    sim.inject(RAW_KIND, raw=answer)
    sim.inject(RAW_KIND, raw=RawAnswer.make(599, [("intuit_tid", "tid-of-its-own")], b"\xff\x00"))
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    headers = {"Authorization": basic()}

    async with http.post(sim.token_endpoint, data=form, headers=headers) as first:
        assert (first.status, await first.read()) == (200, body.encode())
        assert first.headers.getall("Retry-After") == ["1e12", "7"]
        assert first.headers["X-Odd"] == "caf\u00e9"
        assert first.headers["Content-Type"] == "application/octet-stream"
        assert first.headers["intuit_tid"] == sim.request_log[-1].intuit_tid
    async with http.post(sim.token_endpoint, data=form, headers=headers) as second:
        assert (second.status, await second.read()) == (599, b"\xff\x00")
        assert second.headers.getall("intuit_tid") == ["tid-of-its-own"]
    assert [(e.fault, e.status) for e in sim.request_log] == [(RAW_KIND, 200), (RAW_KIND, 599)]
    # The presented token is still the live one: the raw answers rotated nothing.
    assert (await refresh(http, sim, rt)).status == 200


async def test_a_raw_fault_over_the_control_api(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    raw = {
        "kind": "raw",
        "status": 503,
        "headers": [["Retry-After", "1e12"], ["Content-Type", "text/html"]],
        "body_base64": base64.b64encode(b"<html>\xfe</html>").decode(),
    }
    assert (await control(http, sim, "POST", "faults", raw)).status == 200
    pending = sim.stats()["pending_faults"]["token"]
    assert pending == [{"kind": "raw", "count": 1, "retry_after": None, "status": 503}]
    form = {"grant_type": "refresh_token", "refresh_token": rt}
    async with http.post(sim.token_endpoint, data=form, headers={"Authorization": basic()}) as got:
        assert (got.status, await got.read()) == (503, b"<html>\xfe</html>")
        assert (got.headers["Retry-After"], got.headers["Content-Type"]) == ("1e12", "text/html")

    text = {"kind": "raw", "status": 200, "headers": {"A": "1"}, "body": "{}", "count": 2}
    assert (await control(http, sim, "POST", "faults", text)).status == 200
    assert [(await refresh(http, sim, rt)).text for _ in range(2)] == ["{}", "{}"]

    for bad in (
        {"kind": "raw"},
        {"kind": "raw", "status": 199},
        {"kind": "raw", "status": 1000},
        {"kind": "raw", "status": True},
        {"kind": "raw", "status": 200, "headers": {"Content-Length": "5"}},
        {"kind": "raw", "status": 200, "headers": {"Transfer-Encoding": "chunked"}},
        {"kind": "raw", "status": 200, "headers": {"X": "a\r\nInjected: 1"}},
        {"kind": "raw", "status": 200, "headers": {"bad name": "1"}},
        {"kind": "raw", "status": 200, "headers": {"X": 5}},
        {"kind": "raw", "status": 200, "headers": [["X"]]},
        {"kind": "raw", "status": 200, "body": "a", "body_base64": "YQ=="},
        {"kind": "raw", "status": 200, "body_base64": "not base64!"},
        {"kind": "raw", "status": 200, "body": 5},
        {"kind": "raw", "status": 200, "retry_after": 5},
        {"kind": "500", "status": 200},
    ):
        answer = await control(http, sim, "POST", "faults", bad)
        assert answer.status == 400, bad
        assert answer.json()["error"] == "invalid_request"
    assert sim.stats()["pending_faults"]["token"] == []


def test_every_documented_fault_kind_is_known() -> None:
    documented = {"500", "502_html", "html", "503", "429", "hang", "malformed", "no_token"}
    documented |= {"invalid_grant", "invalid_client", "reset"}
    assert documented == FAULT_KINDS


# -- intuit_tid, the request log and latency ---------------------------------------------


async def test_every_answer_carries_a_unique_intuit_tid(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.inject("500")
    answers = [
        await authorize(http, sim),
        await authorize(http, sim, client_id="bad"),
        await refresh(http, sim, rt),  # the fault
        await refresh(http, sim, rt),
        await refresh(http, sim, "sim-rt-unknown"),
        await token(http, sim, {"grant_type": "refresh_token", "refresh_token": rt}, auth="x"),
        await revoke(http, sim, "sim-rt-unknown"),
        await call(http, "GET", f"{sim.base_url}/_sim/stats"),
        await call(http, "GET", f"{sim.base_url}/no/such/path"),
    ]
    tids = [a.headers.get("intuit_tid") for a in answers]
    assert all(tids)
    assert len(set(tids)) == len(tids)
    # The log names the same tid the client saw.
    assert sim.request_log[2].intuit_tid == tids[2]


async def test_the_request_log_tells_what_was_presented_and_issued(
    http: aiohttp.ClientSession, sim: IntuitSimulator, clock: ManualClock
) -> None:
    sim.settings.rotate_after = 0
    tokens = await connect(http, sim)
    clock.advance(5)
    rotated = (await refresh(http, sim, tokens["refresh_token"])).json()
    await refresh(http, sim, tokens["refresh_token"])

    authorize_entry, exchange, rotation, stale = sim.request_log
    assert (authorize_entry.endpoint, authorize_entry.status) == ("authorize", 302)
    assert authorize_entry.realm_id == tokens["realm_id"]
    assert exchange.grant_type == "authorization_code"
    assert exchange.issued_refresh_token == tokens["refresh_token"]
    assert rotation.at == START.replace(second=5)
    assert rotation.grant_type == "refresh_token"
    assert rotation.presented_refresh_token == tokens["refresh_token"]
    assert rotation.issued_refresh_token == rotated["refresh_token"]
    assert (rotation.status, rotation.error, rotation.fault) == (200, None, None)
    assert (stale.status, stale.error, stale.issued_refresh_token) == (400, "invalid_grant", None)
    assert (stale.stale_use, stale.concurrent_use) == (True, False)
    assert sim.stats()["token"] == {"ok": 2, "rotated": 1, "invalid_grant": 1, "stale_use": 1}


async def test_the_request_log_is_bounded(clock: ManualClock) -> None:
    sim = IntuitSimulator(clock=clock, log_limit=10)
    await sim.start()
    try:
        async with aiohttp.ClientSession() as http:
            rt = sim.grant()["refresh_token"]
            for _ in range(25):
                await refresh(http, sim, rt)
        assert 0 < len(sim.request_log) <= 10
        assert sim.stats()["token"]["ok"] == 25
    finally:
        await sim.close()


async def test_latency_delays_every_token_answer(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    rt = sim.grant()["refresh_token"]
    sim.settings.latency = 0.2
    started = time.monotonic()
    assert (await refresh(http, sim, rt)).status == 200
    assert time.monotonic() - started >= 0.2


# -- control API ---------------------------------------------------------------------


async def control(
    http: aiohttp.ClientSession, sim: IntuitSimulator, method: str, path: str, body: Any = None
) -> Answer:
    return await call(http, method, f"{sim.base_url}/_sim/{path}", json=body)


async def test_control_api_faults_deny_and_grants(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    granted = await control(http, sim, "POST", "grants", {"realm_id": "123"})
    assert granted.status == 200
    tokens = granted.json()
    assert tokens["realm_id"] == "123"
    assert tokens["access_token"].startswith("sim-at-")

    fault = {"kind": "503", "count": 2, "endpoint": "token", "retry_after": 1}
    assert (await control(http, sim, "POST", "faults", fault)).status == 200
    first = await refresh(http, sim, tokens["refresh_token"])
    assert (first.status, first.headers["Retry-After"]) == (503, "1")

    assert (await control(http, sim, "POST", "deny")).status == 200
    assert callback_query(await authorize(http, sim))["error"] == "access_denied"

    for bad in ({"kind": "teapot"}, {"count": 1}, {"kind": "500", "colour": "red"}, [1]):
        answer = await control(http, sim, "POST", "faults", bad)
        assert answer.status == 400
        assert answer.json()["error"] == "invalid_request"


async def test_control_api_mints_grants_in_bulk(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    answer = await control(http, sim, "POST", "grants", {"count": 3})
    assert answer.status == 200
    grants = answer.json()["grants"]
    assert len({g["refresh_token"] for g in grants}) == 3
    assert len({g["realm_id"] for g in grants}) == 3
    for grant in grants:
        assert (await refresh(http, sim, grant["refresh_token"])).status == 200
    assert sim.stats()["connections"] == {"live": 3, "dead": 0}

    most = await control(http, sim, "POST", "grants", {"count": MAX_BULK_GRANTS})
    assert (most.status, len(most.json()["grants"])) == (200, MAX_BULK_GRANTS)

    bad_counts = [0, -1, MAX_BULK_GRANTS + 1, "3", 2.5, True, None]
    for bad in [*({"count": c} for c in bad_counts), {"count": 1, "realm_id": "123"}]:
        answer = await control(http, sim, "POST", "grants", bad)
        assert (answer.status, answer.json()["error"]) == (400, "invalid_request"), bad
    assert sim.stats()["connections"]["live"] == 3 + MAX_BULK_GRANTS


async def test_control_api_invalidate(http: aiohttp.ClientSession, sim: IntuitSimulator) -> None:
    rt = sim.grant()["refresh_token"]
    assert (await control(http, sim, "POST", "invalidate", {"refresh_token": rt})).status == 200
    assert (await refresh(http, sim, rt)).status == 400
    unknown = await control(http, sim, "POST", "invalidate", {"refresh_token": "sim-rt-x"})
    assert (unknown.status, unknown.json()["error"]) == (404, "not_found")
    assert (await control(http, sim, "POST", "invalidate", {})).status == 400


async def test_control_api_log_stats_and_reset(
    http: aiohttp.ClientSession, sim: IntuitSimulator
) -> None:
    tokens = await connect(http, sim)
    sim.inject("500", count=5)

    log = (await control(http, sim, "GET", "log")).json()["entries"]
    assert [e["endpoint"] for e in log] == ["authorize", "token"]
    assert log[1]["at"] == "2026-03-01T12:00:00.000000Z"
    assert log[1]["issued_refresh_token"] == tokens["refresh_token"]
    last = (await control(http, sim, "GET", "log?limit=1")).json()["entries"]
    assert last == log[-1:]

    stats = (await control(http, sim, "GET", "stats")).json()
    assert stats["authorize"] == {"ok": 1}
    assert stats["token"] == {"ok": 1}
    assert stats["connections"] == {"live": 1, "dead": 0}
    assert stats["pending_faults"]["token"] == [{"kind": "500", "count": 5, "retry_after": None}]

    assert (await control(http, sim, "POST", "reset")).status == 200
    assert sim.request_log == []
    assert sim.stats()["pending_faults"]["token"] == []
    assert (await refresh(http, sim, tokens["refresh_token"])).status == 200  # grants kept


async def test_control_api_settings(http: aiohttp.ClientSession, sim: IntuitSimulator) -> None:
    changed = await control(http, sim, "POST", "settings", {"expires_in": 60, "rotate_after": 0})
    assert changed.status == 200
    assert changed.json()["expires_in"] == 60
    assert sim.settings.rotate_after == 0
    assert (await control(http, sim, "GET", "settings")).json()["expires_in"] == 60
    assert sim.grant()["expires_in"] == 60

    for bad in (
        {"colour": "red"},
        {"expires_in": "60"},
        {"expires_in": True},
        {"latency": -1},
        {"hard_expires_in": 1.5},
        {"expires_in": 30, "typo": 1},
    ):
        answer = await control(http, sim, "POST", "settings", bad)
        assert answer.status == 400, bad
        assert answer.json()["error"] == "invalid_request"
    assert sim.settings.expires_in == 60  # a rejected update changes nothing
    changed = await control(http, sim, "POST", "settings", {"hard_expires_in": None})
    assert changed.json()["hard_expires_in"] is None


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="expires_in"):
        SimulatorSettings(expires_in=-1)
    with pytest.raises(ValueError, match="client_id"):
        SimulatorSettings(client_id="")
    settings = SimulatorSettings()
    with pytest.raises(ValueError, match="unknown setting"):
        settings.update(colour="red")


# -- running alone ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_serve_simulator_runs_until_stopped(http: aiohttp.ClientSession) -> None:
    port = free_port()
    stop = asyncio.Event()
    settings = SimulatorSettings(client_id="cli-id")
    server = asyncio.create_task(serve_simulator("127.0.0.1", port, settings, stop))
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            answer = await call(http, "POST", f"{base}/_sim/grants", json={})
            break
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.01)
    else:
        pytest.fail("the simulator never started listening")
    assert answer.status == 200
    assert answer.json()["refresh_token"].startswith("sim-rt-")

    stop.set()
    await asyncio.wait_for(server, 5)
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, "GET", f"{base}/_sim/stats")


async def test_start_reports_the_endpoints(clock: ManualClock) -> None:
    sim = IntuitSimulator(clock=clock)
    base = await sim.start()
    try:
        assert base == sim.base_url
        assert base.startswith("http://127.0.0.1:")
        assert sim.authorization_endpoint == f"{base}/connect/oauth2"
        assert sim.token_endpoint == f"{base}/oauth2/v1/tokens/bearer"
        assert sim.revocation_endpoint == f"{base}/v2/oauth2/tokens/revoke"
        with pytest.raises(RuntimeError):
            await sim.start()
    finally:
        await sim.close()
        await sim.close()
