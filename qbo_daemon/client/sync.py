"""The blocking client of the token API (standard library only) and its ``requests`` auth."""

from __future__ import annotations

import http.client
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from requests import PreparedRequest, Response


class TokenClient:
    """A blocking client of qbo-daemon's token API; safe to share between threads.

    ``url`` is the daemon's API (``[api] listen``, e.g. ``http://127.0.0.1:8765``),
    ``api_key`` one of its ``[api] keys``. Tokens are cached per account until
    ``margin`` before they expire; threads asking for one account's token at
    once make one call to the daemon. Errors are :mod:`qbo_daemon.client.errors`.
    Environment proxies are ignored: the daemon's listener is private.
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
        self._lock = threading.Lock()  # guards _cache and _account_locks
        self._account_locks: dict[str, threading.Lock] = {}
        # No ProxyHandler from the environment: the API key must not go through a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"TokenClient({self.url!r})"

    def token(self, account_id: str, *, with_authorize_url: bool = False) -> Token:
        """A valid access token for ``account_id``, from the cache or the daemon.

        Raises :class:`~qbo_daemon.client.errors.ConnectRequired` (with
        ``authorize_url`` filled when ``with_authorize_url``),
        :class:`~qbo_daemon.client.errors.Unavailable`, or another ClientError.
        """
        with self._lock:
            cached = self._cache.get(account_id)
        if cached is not None:
            return cached
        with self._account_lock(account_id):
            with self._lock:
                cached = self._cache.get(account_id)
            if cached is not None:
                return cached
            return self._fetch(account_id, with_authorize_url)

    def replace_rejected(
        self, account_id: str, access_token: str, *, with_authorize_url: bool = False
    ) -> Token:
        """A token to use instead of ``access_token``, which QuickBooks answered 401 to.

        Forgets the cached token and asks the daemon once; if the daemon still
        serves the rejected one, it asks the daemon to refresh first. Another
        thread that already replaced the token is reused. Raises what
        :meth:`token` raises, and ``NeedsReconnect`` when Intuit refuses the refresh.
        """
        with self._account_lock(account_id):
            with self._lock:
                cached = self._cache.get(account_id)
                if cached is not None and cached.access_token != access_token:
                    return cached
                self._cache.drop(account_id)
            token = self._fetch(account_id, with_authorize_url)
            if token.access_token != access_token:
                return token
            self.refresh(account_id, with_authorize_url=with_authorize_url)
            return self._fetch(account_id, with_authorize_url)

    def refresh(self, account_id: str, *, with_authorize_url: bool = False) -> dict[str, Any]:
        """Have the daemon refresh now (``POST …/refresh``); the account's JSON."""
        with self._lock:
            self._cache.drop(account_id)
        try:
            answer = self._call("POST", account_path(account_id, "/refresh"), account_id)
        except ConnectRequired as exc:
            self._add_authorize_url(exc, with_authorize_url)
            raise
        return json_object(answer)

    def authorize_url(self, account_id: str) -> str:
        """A fresh Intuit authorization URL bound to ``account_id`` (single use, ~10 min)."""
        answer = json_object(
            self._call("POST", account_path(account_id, "/authorize-url"), account_id)
        )
        url = answer.get("url")
        if not isinstance(url, str):
            raise DaemonError(200, "malformed", "the authorize-url answer has no url")
        return url

    def forget(self, account_id: str | None = None) -> None:
        """Drop the cached token of ``account_id`` (of every account when None)."""
        with self._lock:
            self._cache.drop(account_id)

    def requests_auth(
        self,
        account_id: str,
        *,
        with_authorize_url: bool = False,
        api_base: str | Iterable[str] = QUICKBOOKS_API_BASES,
    ) -> RequestsAuth:
        """An auth for ``requests`` that sends this account's token (see :class:`RequestsAuth`)."""
        return RequestsAuth(
            self, account_id, with_authorize_url=with_authorize_url, api_base=api_base
        )

    # -- internals ------------------------------------------------------------------

    def _account_lock(self, account_id: str) -> threading.Lock:
        with self._lock:
            return self._account_locks.setdefault(account_id, threading.Lock())

    def _fetch(self, account_id: str, with_authorize_url: bool) -> Token:
        try:
            body = self._call("GET", account_path(account_id, "/token"), account_id)
        except ConnectRequired as exc:
            self._add_authorize_url(exc, with_authorize_url)
            raise
        token = parse_token(body)
        with self._lock:
            self._cache.put(account_id, token)
        return token

    def _add_authorize_url(self, exc: ConnectRequired, wanted: bool) -> None:
        if wanted:
            exc.authorize_url = self.authorize_url(exc.account_id)

    def _call(self, method: str, path: str, account_id: str | None) -> bytes:
        request = urllib.request.Request(  # noqa: S310 - base_url() allows http(s) only
            self.url + path,
            data=b"" if method == "POST" else None,
            method=method,
            headers={"Authorization": f"Bearer {self._key}", "Accept": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                body: bytes = answer.read()
                return body
        except urllib.error.HTTPError as exc:
            with exc:
                body = exc.read()
                retry_after = exc.headers.get("Retry-After")
            raise error_from_answer(
                exc.code,
                body,
                retry_after,
                account_id=account_id,
                default_retry_after=self.default_retry_after,
                now=self._now(),
            ) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            why = type(reason).__name__ if isinstance(reason, BaseException) else str(reason)
            raise DaemonUnreachable(
                None,
                "unreachable",
                f"qbo-daemon at {self.url} did not answer: {why}",
                self.default_retry_after,
            ) from None


class RequestsAuth:
    """``requests`` auth: adds the account's bearer token; on a 401 retries once.

    Use it as ``session.get(url, auth=client.requests_auth("acme"))``. On a 401
    from QuickBooks it asks the daemon once for a better token
    (:meth:`TokenClient.replace_rejected`) and sends the request again; a second
    401 is returned as it is. A body that cannot be rewound (a generator) is
    not sent again: the 401 is returned. Client errors (``NeedsReconnect``, …)
    propagate from the ``requests`` call.

    The token goes only to ``api_base`` (Intuit's production and sandbox API
    by default; give your own for a stand-in or a proxy): a request to any
    other origin is sent as it is, without a token. ``requests`` itself is
    not imported here: it calls this object with the prepared request.
    """

    def __init__(
        self,
        client: TokenClient,
        account_id: str,
        *,
        with_authorize_url: bool = False,
        api_base: str | Iterable[str] = QUICKBOOKS_API_BASES,
    ) -> None:
        self.client = client
        self.account_id = account_id
        self.with_authorize_url = with_authorize_url
        self.origins = origins(api_base)

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        if origin(str(request.url)) not in self.origins:
            return request
        token = self.client.token(self.account_id, with_authorize_url=self.with_authorize_url)
        request.headers["Authorization"] = token.authorization
        request.hooks["response"].append(self._on_response)
        return request

    def _on_response(self, response: Response, **send_options: Any) -> Response:
        request = response.request
        header = str(request.headers.get("Authorization", ""))
        # A redirect elsewhere lost the header (requests strips it): never add it back there.
        if response.status_code != 401 or not header.startswith("Bearer "):
            return response
        if origin(str(request.url)) not in self.origins or not _rewind(request):
            return response
        rejected = header.removeprefix("Bearer ")
        _ = response.content  # read it, so the connection can be reused
        response.close()
        token = self.client.replace_rejected(
            self.account_id, rejected, with_authorize_url=self.with_authorize_url
        )
        retry = request.copy()
        retry.headers["Authorization"] = token.authorization
        # Without this hook: the retry's own 401 goes back to the caller.
        retry.hooks = {"response": [h for h in request.hooks["response"] if h != self._on_response]}
        answer: Response = response.connection.send(retry, **send_options)
        answer.history.append(response)
        answer.request = retry
        return answer


def _rewind(request: PreparedRequest) -> bool:
    """Whether the request's body can be sent again (rewinding a file-like body)."""
    body = request.body
    if body is None or isinstance(body, bytes | str):
        return True
    if getattr(body, "seek", None) is None:
        return False
    # Imported here, not at the top: requests is optional, and it is running by now.
    from requests.exceptions import UnrewindableBodyError
    from requests.utils import rewind_body

    try:
        rewind_body(request)
    except UnrewindableBodyError:
        return False
    return True
