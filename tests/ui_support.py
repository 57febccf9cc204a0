"""Helpers for the status page's tests: accounts in every status, a signed-in HTTP client,
and the secrets no served page may contain."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aiohttp
from yarl import URL

from qbo_daemon.core.models import iso
from tests.harness import RunningDaemon, wait_for

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')

# What populate() leaves behind, as the API reports it.
EXPECTED = {
    "acme-active": "active",
    "acme-expired": "expired",
    "acme-revoked": "needs_reconnect",
    "acme-gone": "disconnected",
}


async def populate(running: RunningDaemon) -> dict[str, str]:
    """One account in each status, through the API and the simulator; returns EXPECTED."""
    for account_id in ("acme-active", "acme-revoked", "acme-gone"):
        assert await running.connect(account_id) == 200
    revoked = await running.services.storage.load("acme-revoked")
    assert revoked.refresh_token is not None
    running.simulator.invalidate(revoked.refresh_token)  # the user disconnected in QuickBooks
    status, _ = await running.api("POST", "/v1/accounts/acme-revoked/refresh")
    assert status == 409
    status, _ = await running.api("DELETE", "/v1/accounts/acme-gone")
    assert status == 200
    # An import whose access token died, while Intuit has a bad minute: expired, retrying.
    grant = running.simulator.grant()
    running.simulator.inject("503", 1, retry_after=600)
    now = running.services.clock.now()
    status, _ = await running.api(
        "PUT",
        "/v1/accounts/acme-expired/tokens",
        json={
            "refresh_token": grant["refresh_token"],
            "realm_id": grant["realm_id"],
            "access_token": grant["access_token"],
            "token_expires_at": iso(now - timedelta(minutes=1)),
        },
    )
    assert status == 201

    async def failed_once() -> bool:
        account = await running.services.storage.load("acme-expired")
        return account.failure_count == 1

    await wait_for(failed_once)
    return dict(EXPECTED)


async def api_statuses(running: RunningDaemon) -> dict[str, str]:
    status, body = await running.api("GET", "/v1/accounts")
    assert status == 200
    return {item["account_id"]: item["status"] for item in body["accounts"]}


async def secrets_of(running: RunningDaemon) -> set[str]:
    """Every token, key and client secret the daemon holds now (collect it again after changes)."""
    found = {running.api_key, running.encryption_key}
    found.add(running.config.intuit.client_secret.reveal())
    for account in await running.services.storage.list_accounts():
        full = await running.services.storage.load(account.account_id)
        found.update(t for t in (full.access_token, full.refresh_token) if t)
    return {s for s in found if s}


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match is not None, "no CSRF token in the page"
    return match.group(1)


@dataclass
class UiClient:
    """A browser stand-in over plain HTTP: keeps cookies, remembers every page it was served."""

    base: str
    http: aiohttp.ClientSession
    served: list[tuple[str, int, str]] = field(default_factory=list)

    @classmethod
    def open(cls, running: RunningDaemon) -> UiClient:
        # unsafe: the jar would otherwise refuse cookies for an IP address such as 127.0.0.1.
        jar = aiohttp.CookieJar(unsafe=True)
        return cls(running.api_url, aiohttp.ClientSession(cookie_jar=jar))

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False, **kwargs) as response:
            text = await response.text()
        self.served.append((path, response.status, text))
        return response.status, text, response

    async def post(
        self, path: str, data: dict[str, str]
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False) as response:
            text = await response.text()
        self.served.append((path, response.status, text))
        return response.status, text, response

    async def sign_in(self, key: str) -> tuple[int, str, aiohttp.ClientResponse]:
        _, page, _ = await self.get("/ui/login")
        return await self.post("/ui/login", {"csrf": csrf_of(page), "key": key, "next": "/ui/"})

    def set_cookie(self, name: str, value: str) -> None:
        """Replace every cookie with this one, as a browser holding only it would send it."""
        self.http.cookie_jar.clear()
        self.http.cookie_jar.update_cookies({name: value}, URL(self.base + "/ui/"))

    def cookie(self, name: str) -> str | None:
        for morsel in self.http.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None
