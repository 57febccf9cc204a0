"""Builds the status page's aiohttp application, mounted at ``/ui`` on the API's."""

from __future__ import annotations

import jinja2
from aiohttp import web

from qbo_daemon.engine.services import Services
from qbo_daemon.http.ui import actions, pages, signin
from qbo_daemon.http.ui.guard import guard
from qbo_daemon.http.ui.keys import SERVICES, STATIC, TEMPLATES, THROTTLE
from qbo_daemon.http.ui.static import StaticFiles
from qbo_daemon.http.ui.throttle import SignInThrottle
from qbo_daemon.http.ui.views import template_filters

PREFIX = "/ui"


def mount_ui(api: web.Application, services: Services) -> None:
    """Serve the status page under ``/ui/`` of the token API's application."""
    api.add_subapp(PREFIX, make_ui_app(services))


def make_ui_app(services: Services) -> web.Application:
    """The status page; every route sits behind :func:`qbo_daemon.http.ui.guard.guard`."""
    app = web.Application(middlewares=[guard])
    app[SERVICES] = services
    app[TEMPLATES] = _templates()
    app[STATIC] = StaticFiles()
    app[THROTTLE] = SignInThrottle()
    r = app.router
    r.add_get("/", pages.overview, name="overview")
    r.add_get("/accounts", pages.accounts, name="accounts")
    r.add_get("/accounts/{account_id}", pages.account, name="account")
    r.add_get("/accounts/{account_id}/disconnect", pages.confirm_disconnect, name="confirm")
    r.add_post("/accounts/{account_id}/refresh", actions.refresh, name="refresh")
    r.add_post("/accounts/{account_id}/connect-link", actions.connect_link, name="connect_link")
    r.add_post("/accounts/{account_id}/disconnect", actions.disconnect, name="disconnect")
    r.add_get("/login", signin.login_page, name="login")
    r.add_post("/login", signin.login, name="login_post")
    r.add_post("/logout", signin.logout, name="logout")
    r.add_get("/static/{name}", _static, name="static")
    return app


async def _static(request: web.Request) -> web.Response:
    found = request.app[STATIC].get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    response = web.Response(body=found.body, content_type=found.content_type)
    # Pages link each file with its digest (?v=), so a new version is a new URL.
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("qbo_daemon.http.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(template_filters())
    return env
