"""What the sync and async clients share: the token, its cache, the API's paths."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from qbo_daemon.client.errors import DaemonError

# A token is used until this long before its expires_at, then asked for anew. The
# daemon refreshes 10 minutes ahead ([refresh] lead), so a new one is ready by then.
DEFAULT_MARGIN = timedelta(minutes=2)
# Longer than the daemon's longest wait for a refresh ([refresh] token_wait, 30 s).
DEFAULT_TIMEOUT = 60.0
# Where the auth helpers send a token: Intuit's Accounting API, production and sandbox.
QUICKBOOKS_API_BASES = (
    "https://quickbooks.api.intuit.com",
    "https://sandbox-quickbooks.api.intuit.com",
)
_DEFAULT_PORTS = {"http": 80, "https": 443}

Now = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Token:
    """An access token for one tenant's QuickBooks company (``realm_id``).

    ``repr`` leaves the token out, so a logged ``Token`` leaks nothing.
    """

    access_token: str = field(repr=False)
    realm_id: str
    expires_at: datetime

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value for the QuickBooks API."""
        return f"Bearer {self.access_token}"


def parse_token(body: bytes) -> Token:
    """The ``GET …/token`` answer as a :class:`Token`; DaemonError when it is not one."""
    try:
        data = json.loads(body)
        token = Token(
            access_token=data["access_token"],
            realm_id=data["realm_id"],
            expires_at=datetime.fromisoformat(data["expires_at"]),
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        token = None
    if (
        token is None
        or not isinstance(token.access_token, str)
        or not token.access_token
        or not isinstance(token.realm_id, str)
        or token.expires_at.tzinfo is None
    ):
        raise DaemonError(200, "malformed", "the token answer is not the documented JSON")
    return token


class TokenCache:
    """Tokens by account id, each kept until ``margin`` before its ``expires_at``.

    Not locked: the sync client holds its own lock around it; the async one
    runs on one event loop.
    """

    def __init__(self, margin: timedelta, now: Now) -> None:
        if margin < timedelta(0):
            raise ValueError("margin must not be negative")
        self.margin = margin
        self._now = now
        self._tokens: dict[str, Token] = {}

    def get(self, account_id: str) -> Token | None:
        token = self._tokens.get(account_id)
        if token is not None and not self._usable(token):
            del self._tokens[account_id]
            return None
        return token

    def put(self, account_id: str, token: Token) -> None:
        """Keep ``token`` if it is usable for a while yet (a nearly dead one is not kept)."""
        if self._usable(token):
            self._tokens[account_id] = token
        else:
            self._tokens.pop(account_id, None)

    def drop(self, account_id: str | None = None) -> None:
        """Forget one account's token, or every token."""
        if account_id is None:
            self._tokens.clear()
        else:
            self._tokens.pop(account_id, None)

    def _usable(self, token: Token) -> bool:
        return self._now() < token.expires_at - self.margin


def account_path(account_id: str, suffix: str = "") -> str:
    """``/v1/accounts/{account_id}{suffix}``, the id quoted (the daemon validates it)."""
    return f"/v1/accounts/{quote(account_id, safe='')}{suffix}"


def base_url(url: str) -> str:
    """The daemon's base URL without a trailing slash; only http(s) is accepted."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the daemon's URL must start with http:// or https://, not {url!r}")
    return url.rstrip("/")


def json_object(body: bytes) -> dict[str, Any]:
    """An answer that must be a JSON object; DaemonError when it is not."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise DaemonError(200, "malformed", "the daemon's answer is not a JSON object")
    return data


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, lower case, without a default port."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = parts.port
    return f"{scheme}://{host}" + ("" if port in (None, _DEFAULT_PORTS.get(scheme)) else f":{port}")


def origins(api_base: str | Iterable[str]) -> frozenset[str]:
    """The origins an auth helper may send a token to."""
    bases = [api_base] if isinstance(api_base, str) else list(api_base)
    if not bases:
        raise ValueError("api_base must name at least one QuickBooks API base URL")
    for base in bases:
        base_url(base)  # http(s) only
    return frozenset(origin(base) for base in bases)
