"""Plain data: accounts, token sets, secrets, and the pure time helpers around them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

DEFAULT_ACCESS_TOKEN_LIFETIME = timedelta(seconds=3600)
DEFAULT_REFRESH_TOKEN_LIFETIME = timedelta(days=100)

# A host app's tenant id: safe in a URL path, a log line and a file name.
ACCOUNT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
ACCOUNT_ID_RULE = (
    "1 to 128 characters: ASCII letters, digits and . _ : @ -, starting with a letter or digit"
)


def valid_account_id(value: object) -> bool:
    return isinstance(value, str) and ACCOUNT_ID_PATTERN.fullmatch(value) is not None


class AccountStatus(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"  # access token dead, refresh token alive, still retrying
    NEEDS_RECONNECT = "needs_reconnect"
    DISCONNECTED = "disconnected"

    @property
    def scheduled(self) -> bool:
        """Whether the scheduler keeps a timer for an account in this status."""
        return self in (AccountStatus.ACTIVE, AccountStatus.EXPIRED)


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class TokenSet:
    """What one successful token call gave us, with absolute times.

    ``obtained_at`` is when the request was sent: the conservative end, so the
    computed expiries are never later than Intuit's.
    """

    access_token: str
    refresh_token: str
    obtained_at: datetime
    token_expires_at: datetime
    refresh_token_expires_at: datetime
    refresh_token_hard_expires_at: datetime | None = None

    def __repr__(self) -> str:
        return (
            f"TokenSet(obtained_at={self.obtained_at.isoformat()}, "
            f"token_expires_at={self.token_expires_at.isoformat()})"
        )


@dataclass(frozen=True, slots=True)
class Account:
    """One connected QuickBooks company, decrypted. ``repr`` hides the secrets."""

    id: int
    account_id: str
    status: AccountStatus
    realm_id: str | None
    access_token: str | None
    refresh_token: str | None
    token_expires_at: datetime | None
    reconnect_token_at: datetime | None
    refresh_token_expires_at: datetime | None
    refresh_token_hard_expires_at: datetime | None
    failure_count: int
    last_error: str | None
    last_refreshed_at: datetime | None
    version: int
    created_at: datetime
    updated_at: datetime
    # False while Intuit has not yet confirmed that the tokens belong to realm_id
    # (the check failed transiently at connect time); re-checked after each refresh.
    realm_verified: bool = True
    # When an attempt last failed (the status page sorts by it); a connection keeps it.
    last_failure_at: datetime | None = None

    def __repr__(self) -> str:
        return (
            f"Account(account_id={self.account_id!r}, status={self.status.value!r}, "
            f"version={self.version})"
        )

    def public_dict(self) -> dict[str, Any]:
        """The account as the API and CLI show it: times in ISO 8601 UTC, no token."""
        return {
            "account_id": self.account_id,
            "status": self.status.value,
            "realm_id": self.realm_id,
            "realm_verified": self.realm_verified,
            "token_expires_at": iso(self.token_expires_at),
            "reconnect_token_at": iso(self.reconnect_token_at),
            "refresh_token_expires_at": iso(self.refresh_token_expires_at),
            "refresh_token_hard_expires_at": iso(self.refresh_token_hard_expires_at),
            "last_refreshed_at": iso(self.last_refreshed_at),
            "failure_count": self.failure_count,
            "last_error": self.last_error,
            "version": self.version,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


def shown_status(
    status: AccountStatus, token_expires_at: datetime | None, now: datetime
) -> AccountStatus:
    """The status to report: an active row whose access token has died reads expired.

    The row says active until the next attempt writes; the access token is dead now.
    """
    if status is AccountStatus.ACTIVE and token_expires_at is not None and token_expires_at <= now:
        return AccountStatus.EXPIRED
    return status


@dataclass(frozen=True, slots=True)
class ImportItem:
    """An existing connection brought in from elsewhere (an import or ``PUT …/tokens``)."""

    account_id: str
    realm_id: str
    refresh_token: str
    access_token: str | None = None
    token_expires_at: datetime | None = None
    refresh_token_expires_at: datetime | None = None


def utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime; naive values are taken as UTC."""
    if value.tzinfo is UTC:  # the common case (stored and clock times): nothing to convert
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with a ``Z`` and microseconds, so that text order is time order."""
    if value is None:
        return None
    # isoformat is several times faster than strftime, and this runs per row written;
    # in UTC it ends in "+00:00", which becomes the "Z".
    return utc(value).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return utc(datetime.fromisoformat(value))
    except OverflowError:
        # "0001-01-01T00:00:00+14:00" parses, but its UTC instant falls before year 1.
        raise ValueError(f"time out of range: {value!r}") from None
