"""Signing in with an API key, and out.

The sign-in form carries a double-submit token (a random value in a
SameSite=Strict cookie and in the form), so another site cannot sign a browser
in. A wrong key waits :data:`~qbo_daemon.http.ui.throttle.FAILURE_DELAY` before it is
answered, and an address that keeps failing is refused for a minute. Sign-ins
and failures are logged with the key's short id at most, never the key.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets

import structlog
from aiohttp import web

from qbo_daemon.http.ui import session as sessions
from qbo_daemon.http.ui.guard import Refused, read_form
from qbo_daemon.http.ui.html import UI_ROOT, render, safe_next, see_other
from qbo_daemon.http.ui.keys import SERVICES, THROTTLE
from qbo_daemon.http.ui.throttle import FAILURE_DELAY

log = structlog.get_logger("qbo_daemon.http.ui")

LOGIN_COOKIE = "qbo_ui_login"
_LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")
_COOKIE_PATH = UI_ROOT


async def login_page(request: web.Request) -> web.Response:
    return _form(request, next_path=safe_next(request.query.get("next")))


async def login(request: web.Request) -> web.Response:
    form = await read_form(request)
    next_path = safe_next(form.get("next"))
    expected = request.cookies.get(LOGIN_COOKIE, "")
    presented = form.get("csrf", "")
    if not expected or not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Refused(
            403,
            "Form rejected",
            "This sign-in form did not carry a valid security token. Reload it and try again.",
        )
    throttle = request.app[THROTTLE]
    address = request.remote or "unknown"
    wait = throttle.retry_after(address)
    if wait is not None:
        log.warning("ui.sign_in_throttled", remote=address)
        response = _form(
            request,
            next_path=next_path,
            status=429,
            error=f"Too many failed sign-ins. Try again in {int(wait) + 1} s.",
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    services = request.app[SERVICES]
    key = sessions.matching_key(services.config.api.keys, form.get("key", "").strip())
    if key is None:
        throttle.failed(address)
        log.warning("ui.sign_in_failed", remote=address)
        await asyncio.sleep(FAILURE_DELAY)
        return _form(
            request, next_path=next_path, status=401, error="That key is not accepted here."
        )
    cookie, session = sessions.issue(key, services.clock.now())
    log.info("ui.sign_in_succeeded", remote=address, key_id=session.key_id)
    response = see_other(next_path)
    response.set_cookie(
        sessions.COOKIE_NAME,
        cookie,
        max_age=int(sessions.SESSION_TTL.total_seconds()),
        path=_COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    response.del_cookie(LOGIN_COOKIE, path=_COOKIE_PATH)
    return response


async def logout(request: web.Request) -> web.Response:
    response = see_other(f"{UI_ROOT}login")
    response.del_cookie(sessions.COOKIE_NAME, path=_COOKIE_PATH)
    return response


def _form(
    request: web.Request, *, next_path: str, status: int = 200, error: str | None = None
) -> web.Response:
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not _LOGIN_TOKEN.fullmatch(token):
        token = secrets.token_urlsafe(24)
    response = render(
        request, "login.html", status=status, login_csrf=token, next_path=next_path, error=error
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        path=_COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        max_age=3600,
    )
    return response
