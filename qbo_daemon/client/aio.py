"""The asyncio client of the token API (aiohttp) and its aiohttp client middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs

from qbo_daemon.client.errors import (
    DEFAULT_RETRY_AFTER,
    ConnectRequired,
    DaemonError,
    DaemonUnreachable,
    error_from_answer,
)
from qbo_daemon.client.tokens import (
    DEFAULT_MARGIN,
    DEFAULT_TIMEOUT,
    QUICKBOOKS_API_BASES,
    Now,
    Token,
    TokenCache,
    account_path,
    base_url,
    json_object,
    origin,
    origins,
    parse_token,
    utc_now,
)


class AsyncTokenClient:
    """The asyncio twin of :class:`~qbo_daemon.client.TokenClient`, on aiohttp.

    Use it on one event loop, as ``async with AsyncTokenClient(url, key) as
    client:`` or call :meth:`aclose` at the end. Tokens are cached per account
    until ``margin`` before they expire; coroutines asking for one account's
    token at once share one call to the daemon. It has its own
    ``aiohttp.ClientSession`` (no environment proxies, no middlewares).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        margin: timedelta = DEFAULT_MARGIN,
        default_retry_after: float = DEFAULT_RETRY_AFTER,
        now: Now = utc_now,
    ) -> None:
        self.url = base_url(url)
        self._key = api_key
        self.timeout = timeout
        self.default_retry_after = default_retry_after
        self._now = now
        self._cache = TokenCache(margin, now)
        self._account_locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"AsyncTokenClient({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's HTTP session (it opens again if used afterwards)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def token(self, account_id: str, *, with_authorize_url: bool = False) -> Token:
        """A valid access token for ``account_id``, from the cache or the daemon.

        Raises what :meth:`TokenClient.token <qbo_daemon.client.TokenClient.token>` raises.
        """
        cached = self._cache.get(account_id)
        if cached is not None:
            return cached
        async with self._account_lock(account_id):
            cached = self._cache.get(account_id)
            if cached is not None:
                return cached
            return await self._fetch(account_id, with_authorize_url)

    async def replace_rejected(
        self, account_id: str, access_token: str, *, with_authorize_url: bool = False
    ) -> Token:
        """A token to use instead of ``access_token``, which QuickBooks answered 401 to.

        As :meth:`TokenClient.replace_rejected
        <qbo_daemon.client.TokenClient.replace_rejected>`: one ask, a refresh
        first if the daemon still serves the rejected token.
        """
        async with self._account_lock(account_id):
            cached = self._cache.get(account_id)
            if cached is not None and cached.access_token != access_token:
                return cached
            self._cache.drop(account_id)
            token = await self._fetch(account_id, with_authorize_url)
            if token.access_token != access_token:
                return token
            await self.refresh(account_id, with_authorize_url=with_authorize_url)
            return await self._fetch(account_id, with_authorize_url)

    async def refresh(self, account_id: str, *, with_authorize_url: bool = False) -> dict[str, Any]:
        """Have the daemon refresh now (``POST …/refresh``); the account's JSON."""
        self._cache.drop(account_id)
        try:
            body = await self._call("POST", account_path(account_id, "/refresh"), account_id)
        except ConnectRequired as exc:
            await self._add_authorize_url(exc, with_authorize_url)
            raise
        return json_object(body)

    async def authorize_url(self, account_id: str) -> str:
        """A fresh Intuit authorization URL bound to ``account_id`` (single use, ~10 min)."""
        path = account_path(account_id, "/authorize-url")
        url = json_object(await self._call("POST", path, account_id)).get("url")
        if not isinstance(url, str):
            raise DaemonError(200, "malformed", "the authorize-url answer has no url")
        return url

    def forget(self, account_id: str | None = None) -> None:
        """Drop the cached token of ``account_id`` (of every account when None)."""
        self._cache.drop(account_id)

    def aiohttp_auth(
        self,
        account_id: str,
        *,
        with_authorize_url: bool = False,
        api_base: str | Iterable[str] = QUICKBOOKS_API_BASES,
    ) -> AiohttpAuth:
        """An aiohttp client middleware that sends this account's token (:class:`AiohttpAuth`)."""
        return AiohttpAuth(
            self, account_id, with_authorize_url=with_authorize_url, api_base=api_base
        )

    # -- internals ------------------------------------------------------------------

    def _account_lock(self, account_id: str) -> asyncio.Lock:
        return self._account_locks.setdefault(account_id, asyncio.Lock())

    async def _fetch(self, account_id: str, with_authorize_url: bool) -> Token:
        try:
            body = await self._call("GET", account_path(account_id, "/token"), account_id)
        except ConnectRequired as exc:
            await self._add_authorize_url(exc, with_authorize_url)
            raise
        token = parse_token(body)
        self._cache.put(account_id, token)
        return token

    async def _add_authorize_url(self, exc: ConnectRequired, wanted: bool) -> None:
        if wanted:
            exc.authorize_url = await self.authorize_url(exc.account_id)

    async def _call(self, method: str, path: str, account_id: str | None) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                method,
                self.url + path,
                headers={"Authorization": f"Bearer {self._key}", "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as answer:
                body = await answer.read()
                status = answer.status
                retry_after = answer.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DaemonUnreachable(
                None,
                "unreachable",
                f"qbo-daemon at {self.url} did not answer: {type(exc).__name__}",
                self.default_retry_after,
            ) from None
        if not 200 <= status < 300:
            raise error_from_answer(
                status,
                body,
                retry_after,
                account_id=account_id,
                default_retry_after=self.default_retry_after,
                now=self._now(),
            )
        return body


class AiohttpAuth:
    """aiohttp client middleware: adds the account's bearer token; on a 401 retries once.

    Pass it per request, ``qbo.get(url, middlewares=(client.aiohttp_auth("acme"),))``,
    or to a session used for one account, ``aiohttp.ClientSession(middlewares=(auth,))``
    (aiohttp 3.12 or newer). On a 401 from QuickBooks it asks the daemon once
    for a better token (:meth:`AsyncTokenClient.replace_rejected`) and sends the
    request again; a second 401 is returned as it is, and so is a 401 to a body
    that cannot be sent twice (a stream). Client errors propagate from the call.

    The token goes only to ``api_base`` (Intuit's production and sandbox API
    by default; give your own for a stand-in or a proxy). aiohttp runs the
    middleware again for each redirect: a hop to any other origin is sent as
    it is, without a token.
    """

    def __init__(
        self,
        client: AsyncTokenClient,
        account_id: str,
        *,
        with_authorize_url: bool = False,
        api_base: str | Iterable[str] = QUICKBOOKS_API_BASES,
    ) -> None:
        self.client = client
        self.account_id = account_id
        self.with_authorize_url = with_authorize_url
        self.origins = origins(api_base)

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if origin(str(request.url)) not in self.origins:
            return await handler(request)
        token = await self.client.token(self.account_id, with_authorize_url=self.with_authorize_url)
        request.headers[hdrs.AUTHORIZATION] = token.authorization
        response = await handler(request)
        if response.status != 401 or getattr(request.body, "consumed", False):
            return response
        response.release()
        fresh = await self.client.replace_rejected(
            self.account_id, token.access_token, with_authorize_url=self.with_authorize_url
        )
        request.headers[hdrs.AUTHORIZATION] = fresh.authorization
        return await handler(request)
