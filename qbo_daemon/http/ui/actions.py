"""What the status page's buttons do, through the running daemon's services.

The same operations as the token API: a refresh goes through the account
service (single flight with every other asker), a connect link through the connect
flow (a fresh single-use state), a disconnect through the account service
(revoke at Intuit, then forget). The guard has checked the session and the
form's CSRF token before any of these runs.
"""

from __future__ import annotations

from urllib.parse import quote

import structlog
from aiohttp import web

from qbo_daemon.engine.accounts import RefreshResult, RevokeOutcome
from qbo_daemon.http.ui.guard import read_form
from qbo_daemon.http.ui.html import UI_ROOT, render, safe_next, see_other
from qbo_daemon.http.ui.keys import SERVICES, SESSION
from qbo_daemon.http.ui.pages import account_id_of

log = structlog.get_logger("qbo_daemon.http.ui")

_REFRESH_NOTICES = {
    RefreshResult.REFRESHED: "refreshed",
    RefreshResult.FAILED: "refresh_failed",
    RefreshResult.REFUSED: "refresh_refused",
    RefreshResult.PAUSED: "refresh_paused",
    RefreshResult.NOT_REFRESHED: "not_refreshed",
}
_DISCONNECT_NOTICES = {
    RevokeOutcome.REVOKED: "disconnected",
    RevokeOutcome.FAILED: "disconnected_unrevoked",
    RevokeOutcome.NOT_NEEDED: "already_disconnected",
}


async def refresh(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = account_id_of(request)
    form = await read_form(request)
    await services.status.account(account_id, services.clock.now())  # 404 first
    _log(request, "ui.refresh_requested", account_id)
    notice = _REFRESH_NOTICES[await services.accounts.refresh(account_id)]
    return see_other(_with_notice(safe_next(form.get("next") or _page(account_id)), notice))


async def connect_link(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = account_id_of(request)
    url = await services.connect.authorize_url(account_id)
    _log(request, "ui.connect_link_created", account_id)
    return render(request, "connect_link.html", account_id=account_id, url=url)


async def disconnect(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    account_id = account_id_of(request)
    _log(request, "ui.disconnect_requested", account_id)
    result = await services.accounts.disconnect(account_id)
    return see_other(_with_notice(_page(account_id), _DISCONNECT_NOTICES[result.revoke]))


def _page(account_id: str) -> str:
    return f"{UI_ROOT}accounts/{quote(account_id, safe='')}"


def _with_notice(path: str, notice: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}notice={notice}"


def _log(request: web.Request, event: str, account_id: str) -> None:
    log.info(event, account_id=account_id, key_id=request[SESSION].key_id, remote=request.remote)
