"""The status page's one middleware: sessions, CSRF, error pages, security headers.

Every route but sign-in and the static files needs a valid session cookie
(:mod:`qbo_daemon.http.ui.session`); without one a page redirects to the sign-in form
and a form is refused. Every POST but sign-in (which has its own double-submit
token) must carry the session's CSRF token. Every answer, errors included, gets
a strict Content-Security-Policy (no inline script or style anywhere), is not
framable, sends no referrer, and a page is never cached.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from qbo_daemon.core.errors import AccountNotFoundError, StorageError
from qbo_daemon.http.ui import session as sessions
from qbo_daemon.http.ui.html import login_url, render, see_other
from qbo_daemon.http.ui.keys import SERVICES, SESSION

log = structlog.get_logger("qbo_daemon.http.ui")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes a person reaches before signing in.
PUBLIC_ROUTES = frozenset({"login", "login_post", "static"})
MAX_FORM = 16 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class Refused(Exception):
    """A request refused with a page that says why (a bad link, a form without its token)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _checked(request, handler)
    except Refused as exc:
        response = _error(request, exc.status, exc.title, exc.message)
    except AccountNotFoundError as exc:
        response = _error(request, 404, "No such account", str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(request, exc.status, exc.reason, f"{request.method} {request.path}")
    except StorageError as exc:
        log.error("ui.storage_failed", error=str(exc), path=request.path)
        response = _error(request, 503, "Database unavailable", "The database cannot be read now.")
    except Exception as exc:  # a boundary: answer, and log the cause
        log.exception("ui.request_failed", error=str(exc), path=request.path)
        response = _error(request, 500, "Internal error", "See the daemon's log.")
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _checked(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name
    if route in PUBLIC_ROUTES:
        return await handler(request)
    services = request.app[SERVICES]
    session = sessions.verify(
        request.cookies.get(sessions.COOKIE_NAME), services.config.api.keys, services.clock.now()
    )
    if session is None:
        if request.method == "GET":
            return see_other(login_url(request.path_qs))
        raise Refused(
            403, "Signed out", "Your session has ended. Sign in again, then repeat the action."
        )
    request[SESSION] = session
    if request.method == "POST":
        form = await read_form(request)
        if not session.csrf_ok(form.get("csrf")):
            log.warning("ui.csrf_rejected", path=request.path, key_id=session.key_id)
            raise Refused(
                403,
                "Form rejected",
                "This form did not carry a valid security token. Reload the page and try again.",
            )
    return await handler(request)


async def read_form(request: web.Request) -> dict[str, str]:
    """A small urlencoded form's text fields; anything else is refused."""
    if request.content_length is None or request.content_length > MAX_FORM:
        raise Refused(413, "Form too large", f"A form is limited to {MAX_FORM} bytes.")
    form = await request.post()
    return {name: value for name, value in form.items() if isinstance(value, str)}


def _error(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return render(request, "error.html", status=status, title=title, message=message)
