"""The errors the host-app client raises, and how an API answer maps to one.

Every error is a :class:`ClientError`. Three say "the user must connect
QuickBooks" (:class:`ConnectRequired`: :class:`UnknownAccount`,
:class:`NeedsReconnect`, :class:`Disconnected`) and carry an ``authorize_url``
when the client was asked for one; :class:`Unavailable` says "retry later" and
carries ``retry_after``. No message ever carries a token, a key or the
authorize URL (its ``state`` is single use; keep it out of logs too).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# The token API sends no Retry-After: the daemon itself retries Intuit with
# backoff (from [refresh] backoff_initial, 5 s by default), so a few seconds is
# the earliest a new answer is likely.
DEFAULT_RETRY_AFTER = 5.0


class ClientError(Exception):
    """Base of every client error.

    ``status`` is the HTTP status of the daemon's answer (``None`` when there was
    no answer); ``code`` and ``detail`` are its ``{"error", "detail"}``.
    """

    def __init__(self, status: int | None, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({status if status is not None else 'no answer'} {code})")
        self.status = status
        self.code = code
        self.detail = detail


class ApiKeyRejected(ClientError):
    """401: the daemon refused the API key (not one of its ``[api] keys``)."""


class DaemonError(ClientError):
    """Any other refusal (400 a bad account id, 500 a daemon fault): not retryable as is."""


class Unavailable(ClientError):
    """503: no valid token can be served now (Intuit unreachable, storage busy).

    Retry after ``retry_after`` seconds; the daemon keeps retrying Intuit meanwhile.
    """

    def __init__(self, status: int | None, code: str, detail: str, retry_after: float) -> None:
        super().__init__(status, code, detail)
        self.retry_after = retry_after


class DaemonUnreachable(Unavailable):
    """The daemon did not answer (not running, restarting, or too slow)."""


class ConnectRequired(ClientError):
    """The tenant must connect QuickBooks (again): send their browser to ``authorize_url``.

    ``authorize_url`` is set when the call was made with ``with_authorize_url=True``
    (one ``POST /v1/accounts/{id}/authorize-url``); otherwise ``None``.
    """

    def __init__(self, status: int | None, code: str, detail: str, account_id: str) -> None:
        super().__init__(status, code, detail)
        self.account_id = account_id
        self.authorize_url: str | None = None


class UnknownAccount(ConnectRequired):
    """404: the daemon has no such account: the tenant never connected QuickBooks."""


class NeedsReconnect(ConnectRequired):
    """409 ``needs_reconnect``: Intuit refused the refresh token (revoked, expired)."""


class Disconnected(ConnectRequired):
    """409 ``disconnected``: the account was disconnected (``DELETE``): connect again."""


def error_from_answer(
    status: int,
    body: bytes,
    retry_after: str | None,
    *,
    account_id: str | None,
    default_retry_after: float = DEFAULT_RETRY_AFTER,
    now: datetime | None = None,
) -> ClientError:
    """The error for a non-2xx answer of the token API.

    ``retry_after`` is the answer's ``Retry-After`` header, if any (seconds or an
    HTTP date; ``now`` is only for the latter).
    """
    code, detail = _error_body(status, body)
    if status == 401:
        return ApiKeyRejected(status, code, detail)
    if account_id is not None:
        if status == 404 and code == "not_found":
            return UnknownAccount(status, code, detail, account_id)
        if status == 409 and code == "needs_reconnect":
            return NeedsReconnect(status, code, detail, account_id)
        if status == 409 and code == "disconnected":
            return Disconnected(status, code, detail, account_id)
    if status in (502, 503, 504):  # 502 and 504: a proxy in front of a restarting daemon
        delay = parse_retry_after(retry_after, now)
        return Unavailable(status, code, detail, default_retry_after if delay is None else delay)
    return DaemonError(status, code, detail)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _error_body(status: int, body: bytes) -> tuple[str, str]:
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"], str(data.get("detail", ""))
    # Not the daemon's JSON (a proxy's page): say so without quoting it.
    return "http_error", f"HTTP {status} without the daemon's JSON error body"
