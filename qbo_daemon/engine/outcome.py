"""How one refresh attempt ended, as the scheduler, the token service and the API read it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from qbo_daemon.core.errors import IntuitError, TransientIntuitError
from qbo_daemon.core.models import Account


class OutcomeKind(StrEnum):
    SUCCESS = "success"  # Intuit answered new tokens; they are on disk
    CURRENT = "current"  # no call needed: the row changed since the asker read it, and is fresh
    TRANSIENT = "transient"
    INVALID_GRANT = "invalid_grant"
    INVALID_CLIENT = "invalid_client"
    REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105 - a name, not a secret
    SKIPPED = "skipped"  # the account is gone, disconnected, needs a reconnect, or was replaced
    ELSEWHERE = "elsewhere"  # another daemon holds the account's claim (several on PostgreSQL)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    account: Account | None  # the row as the attempt left it (or found it)
    error: IntuitError | None = None
    message: str | None = None
    duration: float | None = None  # seconds the Intuit call took
    intuit_tid: str | None = None
    retry_in: float | None = None  # ELSEWHERE: seconds until the other node's claim runs out

    @property
    def retry_after(self) -> float | None:
        if isinstance(self.error, TransientIntuitError):
            return self.error.retry_after
        return None

    @property
    def fresh(self) -> bool:
        """Whether the attempt leaves the account with new tokens (now or just before)."""
        return self.kind in (OutcomeKind.SUCCESS, OutcomeKind.CURRENT) and self.account is not None

    @property
    def reason(self) -> str:
        """Why it failed, for a log line or an error detail."""
        if self.error is not None:
            return str(self.error)
        return self.message or self.kind.value
