"""The public callback server: the only part of the daemon a browser reaches.

It serves the path of ``[intuit] redirect_uri`` and nothing else. Every page,
errors included (404, 405, 413, 500, and the 400 aiohttp answers to an
unparseable request, see ``http/listener.py``), is ours and carries the same
headers: a CSP of ``default-src 'none'``, ``X-Frame-Options: DENY``,
``nosniff``, ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``
(the URL that brought the browser here holds the authorization code).
"""

from __future__ import annotations

import html
from http import HTTPStatus
from urllib.parse import urlencode, urlsplit, urlunsplit

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from qbo_daemon.engine.connect import ConnectFlow, ConnectResult
from qbo_daemon.http.callback_query import oauth_query

log = structlog.get_logger("qbo_daemon.http.callback")

FLOW = web.AppKey("connect_flow", ConnectFlow)
SUCCESS_REDIRECT = web.AppKey("success_redirect", str)

_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:34em;margin:4em auto;padding:0 1em}}
h1{{font-size:1.4em}}</style></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""


def make_callback_app(
    flow: ConnectFlow, path: str, success_redirect: str | None
) -> web.Application:
    app = web.Application(client_max_size=16 * 1024, middlewares=[_error_pages])
    app[FLOW] = flow
    app[SUCCESS_REDIRECT] = success_redirect or ""
    app.router.add_get(path, _callback)
    return app


async def _callback(request: web.Request) -> web.StreamResponse:
    query = oauth_query(request.query.items())
    result = await request.app[FLOW].complete(query)
    redirect = request.app[SUCCESS_REDIRECT]
    if result.outcome == "connected" and redirect and result.account_id:
        raise web.HTTPSeeOther(
            _with_query(redirect, account_id=result.account_id, status="connected"),
            headers=_HEADERS,
        )
    return render_page(result)


def render_page(result: ConnectResult) -> web.Response:
    return _page(result.http_status, result.title, result.message)


# What an error page says; a status not listed gets its standard phrase.
_ERRORS = {
    400: "The request could not be read.",
    404: "There is nothing here. To connect QuickBooks, start again from the application.",
    405: "This address only answers the browser's return from Intuit.",
    408: "The request took too long to arrive.",
    413: "The request is too large.",
    500: "Something went wrong on our side. Please try again from the application.",
}


def error_page(status: int) -> web.Response:
    """Our page for an error status, with the callback's security headers."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return _page(status, title, _ERRORS.get(status, "The request was not accepted."))


@web.middleware
async def _error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        page = error_page(exc.status)
        if "Allow" in exc.headers:
            page.headers["Allow"] = exc.headers["Allow"]
        return page
    except Exception as exc:  # a boundary: our page, and the cause in the log
        log.exception("callback.request_failed", error=repr(exc))
        return error_page(500)


def _page(status: int, title: str, message: str) -> web.Response:
    body = _PAGE.format(title=html.escape(title), message=html.escape(message))
    return web.Response(
        status=status, text=body, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
