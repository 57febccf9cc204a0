"""Rendering a page: the template, the context every page shares, and redirects."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web

from qbo_daemon.http.ui.keys import SERVICES, SESSION, STATIC, TEMPLATES

UI_ROOT = "/ui/"


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    """The page ``template`` with ``context`` and what the layout needs."""
    app = request.app
    session = request.get(SESSION)
    services = app[SERVICES]
    page = (
        app[TEMPLATES]
        .get_template(template)
        .render(
            request_path=request.path,
            session=session,
            csrf=session.csrf_token() if session is not None else "",
            static=app[STATIC].versions(),
            now=services.clock.now(),
            **context,
        )
    )
    return web.Response(text=page, content_type="text/html", status=status)


def see_other(location: str) -> web.Response:
    """Redirect after a form (303: the browser follows with GET)."""
    return web.Response(status=303, headers={"Location": location})


def safe_next(value: str | None) -> str:
    """A redirect target from a form or query: only a path of this page, never elsewhere."""
    if (
        value
        and value.startswith(UI_ROOT)
        and not value.startswith("//")
        and "\\" not in value
        and all(32 < ord(c) < 127 for c in value)
    ):
        return value
    return UI_ROOT


def login_url(next_path: str) -> str:
    return f"{UI_ROOT}login?next={quote(safe_next(next_path), safe='/')}"
