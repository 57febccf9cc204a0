"""The Intuit OAuth 2.0 client: wire format, strict parsing, failure classes.

Every answer is parsed strictly into a :class:`TokenResult` or one of the
:mod:`qbo_daemon.core.errors` Intuit errors, so the caller never stores a token
from an error body (node-quickbooks 171) and always knows whether retrying
can help:

- ``invalid_grant`` -> :class:`InvalidGrantError` (the user must reconnect);
- ``invalid_client`` / ``unauthorized_client`` / HTTP 401 ->
  :class:`InvalidClientError` (our credentials are wrong, for every account);
- everything else -> :class:`TransientIntuitError`: connection errors,
  timeouts, 5xx, 429, an HTML or malformed body, a 200 without a token, an
  unexpected 4xx. Giving up on a connection is only ever decided by
  ``invalid_grant``.

A 200 whose tokens are sound but whose lifetimes are garbled is accepted:
the refresh token in it may be a rotated one, and the old may already be
dead. Garbled lifetimes read as absent (the refresh token's) or as five
minutes (the access token's), with a warning.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import structlog

from qbo_daemon.config.load import IntuitConfig
from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import (
    IntuitError,
    InvalidClientError,
    InvalidGrantError,
    TransientIntuitError,
)
from qbo_daemon.core.models import (
    DEFAULT_ACCESS_TOKEN_LIFETIME,
    DEFAULT_REFRESH_TOKEN_LIFETIME,
    TokenSet,
    utc,
)

log = structlog.get_logger("qbo_daemon.intuit.client")
# The access token's assumed life when Intuit's expires_in cannot be read.
_GARBLED_ACCESS_LIFETIME = timedelta(minutes=5)

# Asks Intuit to include x_refresh_token_hard_expires_in (the 5-year limit, 2025).
HARD_EXPIRY_HEADER = "x-include-refresh-token-hard-expires-in"


@dataclass(frozen=True, slots=True)
class TokenResult:
    tokens: TokenSet
    intuit_tid: str | None


class IntuitClient:
    """Talks to Intuit's authorization, token and revocation endpoints.

    One ``aiohttp.ClientSession`` for the whole process arrives by constructor;
    every call has its own explicit timeout (the session default is 5 minutes).
    """

    def __init__(self, session: aiohttp.ClientSession, config: IntuitConfig, clock: Clock) -> None:
        self._session = session
        self.config = config
        self._clock = clock

    def authorization_url(self, state: str) -> str:
        query = urlencode(
            {
                "client_id": self.config.client_id,
                "response_type": "code",
                "scope": " ".join(self.config.scopes),
                "redirect_uri": self.config.redirect_uri,
                "state": state,
            },
            quote_via=quote,
        )
        separator = "&" if "?" in self.config.authorization_endpoint else "?"
        return f"{self.config.authorization_endpoint}{separator}{query}"

    async def exchange_code(self, code: str) -> TokenResult:
        """Trade an authorization code (single use) for a token set."""
        return await self._token_call(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.config.redirect_uri,
            },
            previous_refresh_token=None,
        )

    async def refresh(self, refresh_token: str) -> TokenResult:
        """Refresh; the answer's refresh token, or ``refresh_token`` when it has none."""
        return await self._token_call(
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            previous_refresh_token=refresh_token,
        )

    async def revoke(self, token: str) -> str | None:
        """Revoke a refresh (or access) token; returns Intuit's ``intuit_tid``."""
        headers = self._headers()
        headers["Content-Type"] = "application/json"
        status, body, tid, retry_after = await self._post(
            self.config.revocation_endpoint, headers, json.dumps({"token": token}).encode()
        )
        if status == 200:
            return tid
        raise _classify(status, body, tid, retry_after, what="revoke", conceal=token)

    async def _token_call(
        self, form: dict[str, str], *, previous_refresh_token: str | None
    ) -> TokenResult:
        obtained_at = self._clock.now()
        headers = self._headers()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        headers[HARD_EXPIRY_HEADER] = "true"
        status, body, tid, retry_after = await self._post(
            self.config.token_endpoint, headers, urlencode(form).encode()
        )
        if status != 200:
            conceal = form.get("refresh_token") or form.get("code")
            raise _classify(status, body, tid, retry_after, what="token", conceal=conceal)
        return TokenResult(
            tokens=_parse_tokens(body, tid, obtained_at, previous_refresh_token),
            intuit_tid=tid,
        )

    def _headers(self) -> dict[str, str]:
        pair = f"{self.config.client_id}:{self.config.client_secret.reveal()}".encode()
        return {
            "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
            "Accept": "application/json",
        }

    async def _post(
        self, url: str, headers: dict[str, str], data: bytes
    ) -> tuple[int, bytes, str | None, float | None]:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout.total_seconds())
        try:
            async with self._session.post(
                url, data=data, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                body = await response.read()
                tid = response.headers.get("intuit_tid")
                retry_after = _retry_after(response.headers.get("Retry-After"), self._clock.now())
                return response.status, body, tid, retry_after
        except TimeoutError:
            raise TransientIntuitError(
                f"Intuit did not answer within {self.config.timeout.total_seconds():g}s",
                code="timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise TransientIntuitError(
                f"cannot reach Intuit: {type(exc).__name__}: {_safe(str(exc))}",
                code="connection_error",
            ) from None


def _parse_tokens(
    body: bytes, tid: str | None, obtained_at: datetime, previous_refresh_token: str | None
) -> TokenSet:
    data = _json_object(body)
    if data is None:
        raise TransientIntuitError(
            "Intuit answered 200 with a body that is not a JSON object",
            status=200,
            code="malformed_body",
            intuit_tid=tid,
        )
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TransientIntuitError(
            "Intuit answered 200 without an access_token",
            status=200,
            code="no_access_token",
            intuit_tid=tid,
        )
    refresh_token = data.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        if previous_refresh_token is None:
            raise TransientIntuitError(
                "Intuit answered the code exchange without a refresh_token",
                status=200,
                code="no_refresh_token",
                intuit_tid=tid,
            )
        # Keep the token we presented: Intuit rotates only every day or so.
        refresh_token = previous_refresh_token
    if "expires_in" in data:
        # Garbled, it still must not throw away a rotated refresh token: assume a short
        # life, so the next refresh (which brings a sound one) comes soon.
        expires_in = _advisory_seconds(data, "expires_in", tid) or _GARBLED_ACCESS_LIFETIME
    else:
        expires_in = DEFAULT_ACCESS_TOKEN_LIFETIME
    # The refresh token's lifetimes are advisory: a garbled one must not throw away
    # a rotated refresh token (the old one may already be dead), so it reads as absent.
    refresh_in = (
        _advisory_seconds(data, "x_refresh_token_expires_in", tid) or DEFAULT_REFRESH_TOKEN_LIFETIME
    )
    hard_in = _advisory_seconds(data, "x_refresh_token_hard_expires_in", tid)
    return TokenSet(
        access_token=access_token,
        refresh_token=refresh_token,
        obtained_at=obtained_at,
        token_expires_at=obtained_at + expires_in,
        refresh_token_expires_at=obtained_at + refresh_in,
        refresh_token_hard_expires_at=obtained_at + hard_in if hard_in is not None else None,
    )


def _advisory_seconds(data: dict[str, Any], field: str, tid: str | None) -> timedelta | None:
    try:
        return _seconds(data, field, tid)
    except TransientIntuitError:
        log.warning("intuit.field_ignored", field=field, intuit_tid=tid, detail="taken as absent")
        return None


def _seconds(data: dict[str, Any], field: str, tid: str | None) -> timedelta | None:
    value = data.get(field)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise TransientIntuitError(
            f"Intuit answered with an invalid {field}",
            status=200,
            code="malformed_body",
            intuit_tid=tid,
        )
    return timedelta(seconds=value)


def _classify(
    status: int,
    body: bytes,
    tid: str | None,
    retry_after: float | None,
    *,
    what: str,
    conceal: str | None = None,
) -> IntuitError:
    data = _json_object(body)
    code = data.get("error") if data else None
    code = code if isinstance(code, str) else None
    description = data.get("error_description") if data else None
    if isinstance(description, str) and conceal:
        # A server (or a proxy) may echo what it was sent: never repeat the token or code.
        description = description.replace(conceal, "[redacted]")
    detail = f": {_safe(description)}" if isinstance(description, str) and description else ""
    if code == "invalid_grant":
        return InvalidGrantError(
            f"Intuit refused the grant (invalid_grant{detail})",
            status=status,
            code=code,
            intuit_tid=tid,
        )
    if code in ("invalid_client", "unauthorized_client") or status == 401:
        return InvalidClientError(
            f"Intuit refused our client credentials ({code or f'HTTP {status}'}{detail}); "
            "check [intuit] client_id and client_secret",
            status=status,
            code=code or "invalid_client",
            intuit_tid=tid,
        )
    if data is None:
        kind = "an HTML page" if body.lstrip()[:1] == b"<" else "a body that is not JSON"
        message = f"Intuit {what} call answered HTTP {status} with {kind}"
    else:
        message = f"Intuit {what} call answered HTTP {status} ({code or 'no error code'}{detail})"
    return TransientIntuitError(
        message,
        status=status,
        code=code or f"http_{status}",
        intuit_tid=tid,
        retry_after=retry_after,
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max((utc(when) - now).total_seconds(), 0.0)


def _safe(text: str, limit: int = 200) -> str:
    """Intuit's own words, trimmed to one short line for logs and errors."""
    return " ".join(text.split())[:limit]


__all__ = ["HARD_EXPIRY_HEADER", "IntuitClient", "TokenResult"]
