"""What a host app meets, for the client and host-app docs tests.

A stand-in for the QuickBooks Accounting API on 127.0.0.1 accepts a bearer
token exactly when the Intuit simulator says the token is live (issued,
unexpired, its connection not revoked), as QuickBooks does for Intuit's
tokens, and answers 401 with Intuit's fault body otherwise. A realm in
``unknown_realms`` is refused with 401 whatever the token (a token used on
another company). Every request is recorded. Accounts are imported from
connections minted at the simulator.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from qbo_daemon.core.models import iso
from qbo_daemon.simulator.app import IntuitSimulator
from tests.harness import RunningDaemon

STALE = "stale-access-token-from-the-old-table"

_FAULT = {
    "Fault": {
        "Error": [
            {
                "Message": "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                "code": "3200",
            }
        ],
        "type": "AUTHENTICATION",
    }
}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    access_token: str
    body: bytes
    status: int


@dataclass
class QuickBooksApi:
    simulator: IntuitSimulator
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    unknown_realms: set[str] = field(default_factory=set)

    def tokens_presented(self) -> list[str]:
        return [s.access_token for s in self.seen]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        token = _bearer(request)
        realm = request.match_info["realm"]
        ok = (
            token
            and realm not in self.unknown_realms
            and self.simulator.is_access_token_valid(token)
        )
        status = 200 if ok else 401
        self.seen.append(Seen(request.method, request.path, token, body, status))
        if not ok:
            return web.json_response(_FAULT, status=401)
        if request.method == "POST":
            return web.json_response({"Invoice": {"Id": str(len(self.seen))}})
        return web.json_response({"CompanyInfo": {"CompanyName": f"Company {realm}"}})

    async def moved(self, request: web.Request) -> web.Response:
        """A redirect to the same server under another origin (localhost, not 127.0.0.1)."""
        self.seen.append(Seen("GET", request.path, _bearer(request), b"", 302))
        realm = request.match_info["realm"]
        port = request.url.port
        location = f"http://localhost:{port}/v3/company/{realm}/companyinfo/{realm}"
        raise web.HTTPFound(location)

    def moved_url(self, realm: str) -> str:
        return f"{self.url}/v3/company/{realm}/moved"

    def company_info_url(self, realm: str) -> str:
        return f"{self.url}/v3/company/{realm}/companyinfo/{realm}"

    def invoice_url(self, realm: str) -> str:
        return f"{self.url}/v3/company/{realm}/invoice"


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme == "Bearer" else ""


@contextlib.asynccontextmanager
async def serve_quickbooks(simulator: IntuitSimulator) -> AsyncIterator[QuickBooksApi]:
    api = QuickBooksApi(simulator)
    app = web.Application()
    app.router.add_get("/v3/company/{realm}/companyinfo/{other}", api.handle)
    app.router.add_post("/v3/company/{realm}/invoice", api.handle)
    app.router.add_get("/v3/company/{realm}/moved", api.moved)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        api.url = f"http://{host}:{port}"
        yield api
    finally:
        await runner.cleanup()


async def import_account(
    running: RunningDaemon, account_id: str = "acme", **fields: Any
) -> dict[str, Any]:
    """A real connection minted at the simulator, imported; returns the grant."""
    grant = running.simulator.grant()
    body = {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"], **fields}
    status, answer = await running.api("PUT", f"/v1/accounts/{account_id}/tokens", json=body)
    assert status == 201, answer
    return grant


async def import_stale(running: RunningDaemon, account_id: str = "acme") -> dict[str, Any]:
    """An import whose access token QuickBooks no longer takes, though it has 50 min left."""
    expires = datetime.now(UTC) + timedelta(minutes=50)
    return await import_account(
        running, account_id, access_token=STALE, token_expires_at=iso(expires)
    )


async def browse(url: str) -> int:
    """The user's browser following an authorization URL to the daemon's callback page."""
    async with aiohttp.ClientSession() as browser, browser.get(url) as page:
        return page.status
