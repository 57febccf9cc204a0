"""A client of qbo-daemon's token API for host apps: sync, async, and auth helpers.

::

    from qbo_daemon.client import ConnectRequired, TokenClient, Unavailable

    daemon = TokenClient("http://127.0.0.1:8765", api_key)
    token = daemon.token("acme")        # cached until shortly before it expires
    token.access_token, token.realm_id

    session.get(url, auth=daemon.requests_auth("acme"))   # requests; a 401 is retried once

:class:`AsyncTokenClient` is the same on aiohttp, with :class:`AiohttpAuth` as
client middleware. Importing this package loads none of the daemon: a host
app needs only the ``qbo-daemon`` distribution, not a running daemon's
configuration. See docs/host-apps.md.
"""

from qbo_daemon.client.aio import AiohttpAuth, AsyncTokenClient
from qbo_daemon.client.errors import (
    DEFAULT_RETRY_AFTER,
    ApiKeyRejected,
    ClientError,
    ConnectRequired,
    DaemonError,
    DaemonUnreachable,
    Disconnected,
    NeedsReconnect,
    Unavailable,
    UnknownAccount,
)
from qbo_daemon.client.sync import RequestsAuth, TokenClient
from qbo_daemon.client.tokens import DEFAULT_MARGIN, Token

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_RETRY_AFTER",
    "AiohttpAuth",
    "ApiKeyRejected",
    "AsyncTokenClient",
    "ClientError",
    "ConnectRequired",
    "DaemonError",
    "DaemonUnreachable",
    "Disconnected",
    "NeedsReconnect",
    "RequestsAuth",
    "Token",
    "TokenClient",
    "Unavailable",
    "UnknownAccount",
]
