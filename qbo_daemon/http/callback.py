"""The public callback server: the only part of the daemon a browser reaches.

It serves the path of ``[intuit] redirect_uri`` and nothing else. Pages carry
``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``: the URL that
brought the browser here holds the authorization code.
"""

from __future__ import annotations

import html
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from qbo_daemon.engine.connect import ConnectFlow, ConnectResult
from qbo_daemon.http.callback_query import oauth_query

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
    app = web.Application(client_max_size=16 * 1024)
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
    body = _PAGE.format(title=html.escape(result.title), message=html.escape(result.message))
    return web.Response(
        status=result.http_status,
        text=body,
        content_type="text/html",
        charset="utf-8",
        headers=_HEADERS,
    )


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
