"""The whole loop once: connect through the callback, refresh, serve a token."""

from __future__ import annotations

import sqlite3

from tests.conftest import StartDaemon
from tests.harness import next_refresh, wait_for


async def test_connect_refresh_and_serve(daemon_factory: StartDaemon) -> None:
    running = await daemon_factory()
    assert await running.connect("acme") == 200

    status, account = await running.api("GET", "/v1/accounts/acme")
    assert status == 200
    assert account["status"] == "active"
    assert account["realm_id"]

    status, body = await running.api("POST", "/v1/accounts/acme/refresh")
    assert status == 200, body
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    assert running.simulator.is_access_token_valid(token["access_token"])

    await wait_for(lambda: next_refresh(running.services, "acme"))
    with sqlite3.connect(running.database) as db:
        row = db.execute(
            "SELECT status, version FROM accounts WHERE account_id = 'acme'"
        ).fetchone()
    assert row == ("active", 2)
