"""The token API over real HTTP against a real daemon and the Intuit simulator.

Every JSON answer a test sees goes through :func:`call`, which checks it
against the schema the OpenAPI document gives for that path, method and
status: the document is kept true by every test here.
"""

from __future__ import annotations

import asyncio
import io
import json as jsonlib
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from qbo_daemon.config.load import load_config
from qbo_daemon.core.errors import MissingKeyError
from qbo_daemon.core.models import iso
from qbo_daemon.http.api import MAX_BODY, make_api_app
from qbo_daemon.http.openapi import openapi_document
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.store.crypto import EncryptionKey, generate_key
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, next_refresh, wait_for
from tests.manual_clock import ManualClock

DOC = openapi_document()
_METHODS = {"get", "put", "post", "delete", "patch"}


def _template(path: str) -> str:
    for template in map(str, DOC["paths"]):
        pattern = re.sub(r"\{[^}]+\}", r"[^/]+", template)
        if re.fullmatch(pattern, path.split("?")[0]):
            return template
    raise AssertionError(f"{path} is not in the OpenAPI document")


def check_answer(method: str, path: str, status: int, body: Any) -> None:
    """Fail unless the document lists ``status`` for this operation and ``body`` fits it."""
    operation = DOC["paths"][_template(path)][method.lower()]
    response = operation["responses"].get(str(status))
    assert response is not None, f"{method} {path} answered {status}, which is not documented"
    schema = response["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": DOC["components"]}).validate(body)


async def call(
    running: RunningDaemon,
    method: str,
    path: str,
    *,
    json: Any = None,
    data: Any = None,
    key: str | None = None,
) -> tuple[int, Any]:
    """One request with the API key (or ``key``); the answer is checked against the document."""
    headers = {"Authorization": f"Bearer {running.api_key if key is None else key}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with running.session.request(
        method, running.api_url + path, json=json, data=data, headers=headers
    ) as answer:
        assert answer.content_type == "application/json", await answer.text()
        body = await answer.json()
        status = answer.status
    check_answer(method, path, status, body)
    return status, body


def grant_body(running: RunningDaemon, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real connection minted at the simulator, as an import body."""
    grant = running.simulator.grant()
    body = {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"], **extra}
    return grant, body


async def import_valid_for(running: RunningDaemon, clock: ManualClock, minutes: int) -> None:
    """Import "acme" with an access token ("imported-access-token") valid ``minutes`` more."""
    _, body = grant_body(
        running,
        access_token="imported-access-token",
        token_expires_at=iso(clock.now() + timedelta(minutes=minutes)),
    )
    assert (await call(running, "PUT", "/v1/accounts/acme/tokens", json=body))[0] == 201


def refreshes_of(running: RunningDaemon, refresh_token: str) -> list[Any]:
    return [
        entry
        for entry in running.simulator.request_log
        if entry.endpoint == "token" and entry.presented_refresh_token == refresh_token
    ]


@pytest.fixture
async def running(daemon_factory: StartDaemon) -> RunningDaemon:
    return await daemon_factory()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


# -- the document --------------------------------------------------------------------


async def test_routes_are_exactly_the_documented_operations(running: RunningDaemon) -> None:
    app = make_api_app(running.services)
    routes = {
        (resource.canonical, route.method.lower())
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in DOC["paths"].items()
        for method in item
        if method in _METHODS
    }
    assert routes == documented


def test_document_is_consistent() -> None:
    assert DOC["openapi"].startswith("3.1")
    Draft202012Validator.check_schema({"$defs": DOC["components"]["schemas"]})
    schemas = DOC["components"]["schemas"]
    text = repr(DOC)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in schemas, name
    for path, item in DOC["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, method)
            public = operation.get("security") == []
            assert public == (path in {"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})
            if not public:
                assert "401" in operation["responses"], (path, method)


def test_the_check_refuses_a_secret_or_an_undocumented_answer() -> None:
    account = {
        "account_id": "acme",
        "status": "active",
        "realm_id": "1",
        "realm_verified": True,
        "token_expires_at": None,
        "reconnect_token_at": None,
        "refresh_token_expires_at": None,
        "refresh_token_hard_expires_at": None,
        "last_refreshed_at": None,
        "failure_count": 0,
        "last_error": None,
        "version": 1,
        "created_at": "2024-05-01T09:30:00.000000Z",
        "updated_at": "2024-05-01T09:30:00.000000Z",
        "next_refresh_at": None,
        "hard_expiry_soon": False,
    }
    check_answer("GET", "/v1/accounts", 200, {"accounts": [account]})
    with pytest.raises(ValidationError):
        check_answer("GET", "/v1/accounts", 200, {"accounts": [{**account, "refresh_token": "x"}]})
    with pytest.raises(ValidationError):
        check_answer("GET", "/v1/accounts/acme", 200, {**account, "created_at": "yesterday"})
    with pytest.raises(AssertionError, match="not documented"):
        check_answer("GET", "/v1/accounts/acme", 418, {"error": "teapot", "detail": ""})


async def test_document_is_served_without_a_key(running: RunningDaemon) -> None:
    status, body = await call(running, "GET", "/v1/openapi.json", key="")
    assert status == 200
    assert body == DOC


# -- keys, routes, bodies ------------------------------------------------------------


async def test_a_missing_or_wrong_key_is_401(running: RunningDaemon) -> None:
    for key in ("", "wrong-key", running.api_key + "x", running.api_key[:-1]):
        status, body = await call(running, "GET", "/v1/accounts", key=key)
        assert (status, body["error"]) == (401, "unauthorized")
    async with running.session.get(
        running.api_url + "/v1/accounts", headers={"Authorization": f"Basic {running.api_key}"}
    ) as answer:
        assert answer.status == 401
    async with running.session.get(
        running.api_url + "/v1/accounts", headers={"Authorization": f"bearer {running.api_key}"}
    ) as answer:
        assert answer.status == 200
    for path in ("/healthz", "/readyz"):
        status, _ = await call(running, "GET", path, key="")
        assert status == 200
    async with running.session.get(running.api_url + "/metrics") as answer:
        assert answer.status == 200
        assert "qbo" in await answer.text()


async def test_unknown_routes_and_methods_answer_json(running: RunningDaemon) -> None:
    async with running.session.get(running.api_url + "/v1/nope", headers=running.headers) as r:
        assert (r.status, (await r.json())["error"]) == (404, "not_found")
    async with running.session.get(running.api_url + "/v1/nope") as r:
        assert r.status == 401  # no key: the route list is not shown
    async with running.session.patch(
        running.api_url + "/v1/accounts/acme", headers=running.headers
    ) as r:
        assert (r.status, (await r.json())["error"]) == (405, "method_not_allowed")


async def test_unknown_account_is_404_everywhere(running: RunningDaemon) -> None:
    for method, suffix in (
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/token"),
        ("POST", "/refresh"),
    ):
        status, body = await call(running, method, f"/v1/accounts/ghost{suffix}")
        assert (status, body["error"]) == (404, "not_found"), (method, suffix)
        assert "ghost" in body["detail"]
    status, body = await call(running, "GET", "/v1/accounts/-bad")
    assert (status, body["error"], body["field"]) == (400, "invalid_account_id", "account_id")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"refresh_token": "rt", "realm_id": "1", "colour": "red"}, "colour"),
        ({"refresh_token": 5, "realm_id": "1"}, "refresh_token"),
        ({"realm_id": "1"}, "refresh_token"),
        ({"refresh_token": "rt"}, "realm_id"),
        ({"refresh_token": "rt", "realm_id": "1", "token_expires_at": "soon"}, "token_expires_at"),
        (
            {"refresh_token": "rt", "realm_id": "1", "token_expires_at": 1700000000},
            "token_expires_at",
        ),
        (
            {
                "refresh_token": "rt",
                "realm_id": "1",
                "refresh_token_expires_at": "2001-01-01 00:00",
            },
            "refresh_token_expires_at",
        ),
        ({"refresh_token": "rt", "realm_id": "not a realm"}, "realm_id"),
    ],
)
async def test_a_bad_import_body_is_400_naming_the_field(
    running: RunningDaemon, body: dict[str, Any], field: str
) -> None:
    status, answer = await call(running, "PUT", "/v1/accounts/acme/tokens", json=body)
    assert (status, answer["error"], answer["field"]) == (400, "invalid_field", field)
    assert answer["detail"].startswith(f"{field}: ")
    status, _ = await call(running, "GET", "/v1/accounts/acme")
    assert status == 404  # nothing written


async def test_a_body_that_is_not_a_json_object_is_400(running: RunningDaemon) -> None:
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        status, body = await call(running, "PUT", "/v1/accounts/acme/tokens", data=data)
        assert (status, body["error"]) == (400, "invalid_json"), data
    status, body = await call(running, "POST", "/v1/import", json={"accounts": {}})
    assert (status, body["field"]) == (400, "accounts")
    status, body = await call(running, "POST", "/v1/import", json={"accounts": [], "replace": 1})
    assert (status, body["field"]) == (400, "replace")
    status, body = await call(running, "POST", "/v1/keys/rotate", json={"batch": 0})
    assert (status, body["field"]) == (400, "batch")
    status, body = await call(running, "POST", "/v1/keys/rotate", json={"bach": 5})
    assert (status, body["field"]) == (400, "bach")


async def test_an_oversized_body_is_413(running: RunningDaemon) -> None:
    big = {"refresh_token": "r" * MAX_BODY, "realm_id": "1"}
    status, body = await call(running, "PUT", "/v1/accounts/acme/tokens", json=big)
    assert (status, body["error"]) == (413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit still holds
        yield b'{"refresh_token": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"r" * 1024
        yield b'", "realm_id": "1"}'

    status, body = await call(running, "PUT", "/v1/accounts/acme/tokens", data=chunks())
    assert (status, body["error"]) == (413, "too_large")
    status, _ = await call(running, "GET", "/v1/accounts/acme")
    assert status == 404


# -- import, listing, token ------------------------------------------------------------


async def test_import_refreshes_at_once_and_listing_carries_no_secret(
    running: RunningDaemon,
) -> None:
    grant, body = grant_body(running, access_token="stale-access-token")
    status, account = await call(running, "PUT", "/v1/accounts/acme/tokens", json=body)
    assert status == 201
    # No expiry given: the access token is not known to be valid (so it reads
    # expired), and it is refreshed now.
    assert account["status"] == "expired"
    assert account["realm_id"] == grant["realm_id"]
    await wait_for(
        lambda: any(e.status == 200 for e in refreshes_of(running, grant["refresh_token"]))
    )
    await wait_for(lambda: next_refresh(running.services, "acme"))
    assert (await call(running, "GET", "/v1/accounts/acme"))[1]["status"] == "active"
    status, token = await call(running, "GET", "/v1/accounts/acme/token")
    assert status == 200
    assert token["realm_id"] == grant["realm_id"]
    assert running.simulator.is_access_token_valid(token["access_token"])

    for path in ("/v1/accounts", "/v1/accounts/acme"):
        async with running.session.get(running.api_url + path, headers=running.headers) as r:
            text = await r.text()
        for secret in (grant["refresh_token"], token["access_token"], "stale-access-token"):
            assert secret not in text
        check_answer("GET", path, r.status, jsonlib.loads(text))

    status, again = await call(running, "PUT", "/v1/accounts/acme/tokens", json=body)
    assert status == 200  # replaced
    assert again["version"] > account["version"]


async def test_token_inside_the_lead_is_served_at_once_and_refreshed_behind(
    daemon_factory: StartDaemon, clock: ManualClock
) -> None:
    running = await daemon_factory(clock=clock)
    grant, body = grant_body(
        running,
        access_token="imported-access-token",
        token_expires_at=iso(clock.now() + timedelta(minutes=20)),
    )
    status, account = await call(running, "PUT", "/v1/accounts/acme/tokens", json=body)
    assert status == 201
    assert account["next_refresh_at"] == iso(clock.now() + timedelta(minutes=10))  # lead 10m
    clock.jump_wall(timedelta(minutes=11))  # inside the lead; the timer has not woken

    status, token = await call(running, "GET", "/v1/accounts/acme/token")
    assert (status, token["access_token"]) == (200, "imported-access-token")
    await wait_for(
        lambda: any(e.status == 200 for e in refreshes_of(running, grant["refresh_token"]))
    )

    async def refreshed() -> bool:
        _, token = await call(running, "GET", "/v1/accounts/acme/token")
        return bool(token["access_token"] != "imported-access-token")

    await wait_for(refreshed)
    assert len(refreshes_of(running, grant["refresh_token"])) == 1


async def test_an_expired_token_waits_for_one_shared_refresh(
    daemon_factory: StartDaemon, clock: ManualClock
) -> None:
    running = await daemon_factory(clock=clock)
    running.simulator.settings.update(latency=0.3)
    grant, body = grant_body(
        running,
        access_token="imported-access-token",
        token_expires_at=iso(clock.now() + timedelta(minutes=20)),
    )
    assert (await call(running, "PUT", "/v1/accounts/acme/tokens", json=body))[0] == 201
    clock.jump_wall(timedelta(minutes=30))  # dead; the timer sleeps on

    answers = await asyncio.gather(
        *(call(running, "GET", "/v1/accounts/acme/token") for _ in range(5))
    )
    tokens = {body["access_token"] for status, body in answers if status == 200}
    assert len(tokens) == 1, answers
    [token] = tokens
    assert token != "imported-access-token"
    assert running.simulator.is_access_token_valid(token)
    assert len(refreshes_of(running, grant["refresh_token"])) == 1


async def test_intuit_down_503_without_a_valid_token_200_with_one(
    daemon_factory: StartDaemon, clock: ManualClock
) -> None:
    running = await daemon_factory(clock=clock)
    await import_valid_for(running, clock, minutes=20)
    running.simulator.inject("503", 50, retry_after=0)

    clock.jump_wall(timedelta(minutes=19, seconds=30))  # 30 s left: it waits for a refresh
    status, token = await call(running, "GET", "/v1/accounts/acme/token")
    assert (status, token["access_token"]) == (200, "imported-access-token")  # still valid

    clock.jump_wall(timedelta(minutes=1))  # dead now
    status, error = await call(running, "GET", "/v1/accounts/acme/token")
    assert (status, error["error"]) == (503, "unavailable")
    assert "retry" in error["detail"]
    status, error = await call(running, "POST", "/v1/accounts/acme/refresh")
    assert (status, error["error"]) == (503, "unavailable")
    status, account = await call(running, "GET", "/v1/accounts/acme")
    assert account["status"] == "expired"
    assert account["failure_count"] >= 2


async def test_an_account_whose_access_token_died_between_retries_reads_expired(
    daemon_factory: StartDaemon, clock: ManualClock
) -> None:
    running = await daemon_factory(clock=clock)
    await import_valid_for(running, clock, minutes=11)
    # Intuit asks for ten minutes' patience; the token dies before the retry.
    running.simulator.inject("503", 5, retry_after=600)
    clock.advance(60)  # the lead: the refresh is due and fails

    async def failed_once() -> bool:
        _, account = await call(running, "GET", "/v1/accounts/acme")
        return bool(account["failure_count"] == 1)

    await wait_for(failed_once)
    _, account = await call(running, "GET", "/v1/accounts/acme")
    assert account["status"] == "active"  # the token still has 10 minutes

    clock.jump_wall(timedelta(minutes=10, seconds=1))  # dead, the retry not yet due
    status, account = await call(running, "GET", "/v1/accounts/acme")
    assert (status, account["status"]) == (200, "expired")
    assert len(running.simulator.request_log) == 1  # the retry waits for Retry-After
    _, listing = await call(running, "GET", "/v1/accounts")
    assert [a["status"] for a in listing["accounts"]] == ["expired"]


async def test_a_dead_refresh_token_is_409_needs_reconnect_with_a_hint(
    running: RunningDaemon,
) -> None:
    body = {"refresh_token": "never-issued", "realm_id": "4620816365"}
    assert (await call(running, "PUT", "/v1/accounts/acme/tokens", json=body))[0] == 201

    async def needs_reconnect() -> bool:
        _, account = await call(running, "GET", "/v1/accounts/acme")
        return bool(account["status"] == "needs_reconnect")

    await wait_for(needs_reconnect)
    for method, suffix in (("GET", "/token"), ("POST", "/refresh")):
        status, error = await call(running, method, f"/v1/accounts/acme{suffix}")
        assert (status, error["error"]) == (409, "needs_reconnect")
        assert "/v1/accounts/acme/authorize-url" in error["detail"]
    status, listing = await call(running, "GET", "/v1/accounts")
    [account] = listing["accounts"]
    assert account["next_refresh_at"] is None
    assert "invalid_grant" in (account["last_error"] or "")


async def test_refresh_now_and_authorize_url(running: RunningDaemon) -> None:
    _, body = grant_body(running)
    await call(running, "PUT", "/v1/accounts/acme/tokens", json=body)
    await wait_for(lambda: next_refresh(running.services, "acme"))
    _, before = await call(running, "GET", "/v1/accounts/acme")
    status, after = await call(running, "POST", "/v1/accounts/acme/refresh")
    assert status == 200
    assert after["version"] > before["version"]
    assert after["last_refreshed_at"] > before["last_refreshed_at"]

    urls = [
        (await call(running, "POST", "/v1/accounts/newco/authorize-url"))[1]["url"] for _ in "ab"
    ]
    assert all(url.startswith(running.simulator.authorization_endpoint + "?") for url in urls)
    states = {re.search(r"[?&]state=([^&]+)", url).group(1) for url in urls}  # type: ignore[union-attr]
    assert len(states) == 2


# -- disconnect ------------------------------------------------------------------------


async def test_delete_revokes_at_intuit_and_keeps_a_tombstone(running: RunningDaemon) -> None:
    assert await running.connect("acme") == 200
    stored = await running.services.storage.load("acme")
    logs = io.StringIO()
    configure_logging("json", "info", stream=logs)

    status, body = await call(running, "DELETE", "/v1/accounts/acme")
    assert status == 200
    assert (body["status"], body["revoke"]) == ("disconnected", "revoked")
    revokes = [e for e in running.simulator.request_log if e.endpoint == "revoke"]
    assert [(e.status, e.presented_refresh_token) for e in revokes] == [(200, stored.refresh_token)]
    with sqlite3.connect(running.database) as db:
        row = db.execute(
            "SELECT status, access_token, refresh_token FROM accounts WHERE account_id = 'acme'"
        ).fetchone()
    assert row == ("disconnected", None, None)
    assert '"event": "account.revoked"' in logs.getvalue()
    assert stored.refresh_token is not None
    assert stored.refresh_token not in logs.getvalue()

    status, error = await call(running, "GET", "/v1/accounts/acme/token")
    assert (status, error["error"]) == (409, "disconnected")
    status, body = await call(running, "DELETE", "/v1/accounts/acme")
    assert (status, body["revoke"]) == (200, "not_needed")
    assert len([e for e in running.simulator.request_log if e.endpoint == "revoke"]) == 1


async def test_delete_forgets_the_tokens_even_when_the_revoke_fails(
    running: RunningDaemon,
) -> None:
    _, body = grant_body(running)
    await call(running, "PUT", "/v1/accounts/acme/tokens", json=body)
    running.simulator.inject("502_html", endpoint="revoke")
    logs = io.StringIO()
    configure_logging("json", "info", stream=logs)
    status, body = await call(running, "DELETE", "/v1/accounts/acme")
    assert (status, body["status"], body["revoke"]) == (200, "disconnected", "failed")
    assert '"event": "account.revoke_failed"' in logs.getvalue()
    account = await running.services.storage.load("acme")
    assert (account.access_token, account.refresh_token) == (None, None)


# -- key rotation ----------------------------------------------------------------------


async def test_rotation_during_live_refreshes_then_the_old_key_is_dropped(
    daemon_factory: StartDaemon,
) -> None:
    old_key, new_key = generate_key(), generate_key()
    new_id = EncryptionKey.from_text(new_key).key_id
    running = await daemon_factory("rot", encryption_key=old_key)
    # Each account refreshes every second and stays at "Intuit" for 0.6 s of it, and every
    # refresh rotates the refresh token: a lost update (a re-encryption writing back an
    # older token, or a refresh overwriting a re-encryption) would be invalid_grant or an
    # undecryptable row.
    running.simulator.settings.update(expires_in=2, rotate_after=0, latency=0.6)
    grants = [running.simulator.grant() for _ in range(16)]
    rows = [
        {"account_id": f"t{n}", "refresh_token": g["refresh_token"], "realm_id": g["realm_id"]}
        for n, g in enumerate(grants)
    ]
    status, report = await call(running, "POST", "/v1/import", json={"accounts": rows})
    assert (status, len(report["imported"]), report["skipped"]) == (200, 16, [])

    async def refreshed() -> bool:
        _, listing = await call(running, "GET", "/v1/accounts")
        return all(a["version"] >= 2 for a in listing["accounts"])

    await wait_for(refreshed, timeout=30)
    status, error = await call(
        running, "POST", "/v1/keys/rotate", json={"batch": 2, "expected_key_id": new_id}
    )
    assert (status, error["error"]) == (409, "key_mismatch")  # not reloaded yet

    text = running.config_path.read_text(encoding="utf-8")
    running.config_path.write_text(
        text.replace(
            f'encryption_keys = ["{old_key}"]', f'encryption_keys = ["{new_key}", "{old_key}"]'
        ),
        encoding="utf-8",
    )
    await running.daemon.reload(load_config(running.config_path, {}))  # what SIGHUP does
    done, in_flight = 0, []
    while True:
        in_flight.append(running.services.scheduler.in_flight)
        status, answer = await call(
            running, "POST", "/v1/keys/rotate", json={"batch": 1, "expected_key_id": new_id}
        )
        assert status == 200
        assert answer["primary_key_id"] == new_id
        done += answer["reencrypted"]
        if answer["remaining"] == 0:
            break
        await asyncio.sleep(0.1)  # let refreshes start and land between batches
    assert max(in_flight) > 0  # batches ran while refreshes were waiting at Intuit
    assert done <= 16
    with sqlite3.connect(running.database) as db:
        key_ids = {row[0] for row in db.execute("SELECT key_id FROM accounts")}
    assert key_ids == {new_id}

    _, listing = await call(running, "GET", "/v1/accounts")
    versions = {a["account_id"]: a["version"] for a in listing["accounts"]}

    async def refreshed_since() -> bool:
        _, now = await call(running, "GET", "/v1/accounts")
        return all(a["version"] >= versions[a["account_id"]] + 2 for a in now["accounts"])

    await wait_for(refreshed_since, timeout=30)
    _, listing = await call(running, "GET", "/v1/accounts")
    assert {a["status"] for a in listing["accounts"]} == {"active"}
    assert not [e for e in running.simulator.request_log if e.error == "invalid_grant"]
    await running.shutdown()
    running.simulator.settings.update(latency=0.0)

    with pytest.raises(MissingKeyError):
        await daemon_factory("rot", encryption_key=old_key)  # the old key alone: refused
    restarted = await daemon_factory("rot", encryption_key=new_key)
    answers = await asyncio.gather(
        *(call(restarted, "GET", f"/v1/accounts/t{n}/token") for n in range(16))
    )
    assert [status for status, _ in answers] == [200] * 16
    assert all(restarted.simulator.is_access_token_valid(t["access_token"]) for _, t in answers)
