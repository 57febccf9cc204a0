"""When to refresh, and what each outcome makes of an account: the engine's rules, in one place.

Every status transition and every time the daemon computes lives here, as
pure functions of an account, the ``[refresh]`` settings and ``now``: the
``reconnect_token_at`` of new tokens (``lead``), the row a refresh, a failure,
a connection, an import or a disconnect leaves, the retry delay after a
failure, and the status the API shows. The storage port stores what these
return and computes nothing itself.

:class:`RefreshPolicy` holds the settings; a reload swaps them
(:meth:`RefreshPolicy.update`), so ``lead`` and the backoff apply from the next
decision on, like any other setting.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta

from qbo_daemon.config.load import RefreshConfig
from qbo_daemon.core.errors import IntuitError, InvalidGrantError
from qbo_daemon.core.models import (
    DEFAULT_REFRESH_TOKEN_LIFETIME,
    Account,
    AccountStatus,
    ImportItem,
    TokenSet,
    iso,
    shown_status,
)
from qbo_daemon.intuit.parse import after

# A token with less than this left (or less than the lead, if shorter) is
# "about to expire": a reader waits for a fresh one.
NEAR_EXPIRY = timedelta(seconds=60)
# Floor of a retry delay, so full jitter never turns into a hot loop.
MIN_RETRY_DELAY = 0.05


class RefreshPolicy:
    """The ``[refresh]`` rules. One instance is shared by the engine's parts."""

    def __init__(self, settings: RefreshConfig) -> None:
        self.settings = settings

    def update(self, settings: RefreshConfig) -> None:
        """A reload's settings: every decision from now on follows them."""
        self.settings = settings

    @property
    def near_expiry(self) -> timedelta:
        return min(NEAR_EXPIRY, self.settings.lead)

    # -- when ----------------------------------------------------------------------

    def reconnect_at(self, tokens: TokenSet) -> datetime:
        """When new tokens are due for a refresh: ``lead`` before expiry, never before they came.

        A token shorter-lived than the lead (a simulator, a test) is refreshed at
        half its life instead of in a tight loop.
        """
        due = tokens.token_expires_at - self.settings.lead
        if due <= tokens.obtained_at:
            return tokens.obtained_at + (tokens.token_expires_at - tokens.obtained_at) / 2
        return due

    def retry_delay(
        self, failures: int, *, expired: bool, retry_after: float | None, rng: random.Random
    ) -> float:
        """Seconds until the next try after ``failures`` failures in a row.

        Exponential backoff with full jitter. Once the access token is dead, the
        app is already down: the cap is the shorter ``backoff_max_expired``
        (jittered in its upper half). ``Retry-After`` is a floor, but never past
        ``backoff_max``: Intuit's word is not law.
        """
        settings = self.settings
        backoff_max = settings.backoff_max.total_seconds()
        if expired:
            cap = min(backoff_max, settings.backoff_max_expired.total_seconds())
            delay = rng.uniform(cap / 2, cap)
        else:
            initial = settings.backoff_initial.total_seconds()
            delay = rng.uniform(0, min(backoff_max, initial * 2 ** min(failures - 1, 32)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, backoff_max))
        return max(delay, MIN_RETRY_DELAY)

    @property
    def dead_token_retry_every(self) -> float:
        """Seconds between attempts a reader of a dead token may start before its timed retry."""
        return self.settings.backoff_initial.total_seconds()

    def retry_at(self, account: Account | None, delay: float, now: datetime) -> datetime:
        """When to try again: ``delay`` from now, but never after the refresh token dies.

        The last chance is the instant it dies; then the attempt marks the account
        ``needs_reconnect`` without calling Intuit.
        """
        due = after(now, delay)
        dies = account.refresh_token_expires_at if account is not None else None
        if dies is not None and due > dies:
            return max(dies, now)
        return due

    # -- what each outcome leaves ------------------------------------------------

    def connected(
        self,
        account_id: str,
        realm_id: str,
        tokens: TokenSet,
        *,
        now: datetime,
        realm_verified: bool = True,
    ) -> Account:
        """A new connection, a reconnect or an import: active, due at its own time.

        ``id``, ``version`` and ``created_at`` are the store's (it keeps an existing
        row's). ``realm_verified`` is False for a connection whose company Intuit
        could not confirm yet (imports are an operator's word and count as confirmed).
        """
        return Account(
            id=0,
            account_id=account_id,
            status=AccountStatus.ACTIVE,
            realm_id=realm_id,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=tokens.token_expires_at,
            reconnect_token_at=self.reconnect_at(tokens),
            refresh_token_expires_at=tokens.refresh_token_expires_at,
            refresh_token_hard_expires_at=tokens.refresh_token_hard_expires_at,
            failure_count=0,
            last_error=None,
            last_refreshed_at=now,
            version=0,
            created_at=now,
            updated_at=now,
            realm_verified=realm_verified,
        )

    def imported(self, item: ImportItem, *, now: datetime) -> Account:
        """An imported connection; an access token without a known future expiry is dead.

        Such an account is due at once.
        """
        expires = item.token_expires_at
        access = item.access_token
        if access is None or expires is None or expires <= now:
            access, expires = "", now
        tokens = TokenSet(
            access_token=access,
            refresh_token=item.refresh_token,
            obtained_at=now,
            token_expires_at=expires,
            refresh_token_expires_at=item.refresh_token_expires_at
            or now + DEFAULT_REFRESH_TOKEN_LIFETIME,
        )
        return self.connected(item.account_id, item.realm_id, tokens, now=now)

    def refreshed(self, account: Account, tokens: TokenSet, *, now: datetime) -> Account:
        """A successful refresh: new tokens and times, active, failures forgotten."""
        return replace(
            account,
            status=AccountStatus.ACTIVE,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=tokens.token_expires_at,
            reconnect_token_at=self.reconnect_at(tokens),
            refresh_token_expires_at=tokens.refresh_token_expires_at,
            refresh_token_hard_expires_at=_same_instant(
                account.refresh_token_hard_expires_at, tokens.refresh_token_hard_expires_at
            ),
            failure_count=0,
            last_error=None,
            last_refreshed_at=now,
            updated_at=now,
        )

    def failed(self, account: Account, error: IntuitError, *, now: datetime) -> Account:
        """A refused or failed refresh (not ``invalid_client``, which is no account's fault).

        ``invalid_grant`` needs a reconnect; anything else leaves the account
        active, or ``expired`` once its access token is dead.
        """
        if isinstance(error, InvalidGrantError):
            status = AccountStatus.NEEDS_RECONNECT
        elif account.token_expires_at is not None and account.token_expires_at <= now:
            status = AccountStatus.EXPIRED
        else:
            status = account.status
        return self._noted(account, status, str(error), now)

    def refresh_token_death(self, account: Account, now: datetime) -> str | None:
        """Why the refresh token can no longer work, or None while it lives."""
        dies = account.refresh_token_expires_at
        if dies is not None and dies <= now:
            return f"refresh token expired at {iso(dies)}"
        hard = account.refresh_token_hard_expires_at
        if hard is not None and hard <= now:
            return f"refresh token reached Intuit's 5-year hard expiry at {iso(hard)}"
        return None

    def dead(self, account: Account, reason: str, *, now: datetime) -> Account:
        """The refresh token died unused: the user must reconnect."""
        return self._noted(account, AccountStatus.NEEDS_RECONNECT, reason, now)

    @staticmethod
    def realm_verified(account: Account, *, now: datetime) -> Account:
        """Intuit confirmed that the account's tokens belong to its realm."""
        return replace(account, realm_verified=True, updated_at=now)

    def realm_refused(self, account: Account, reason: str, *, now: datetime) -> Account:
        """Intuit said the tokens are not the stored company's: the user must reconnect."""
        return self._noted(account, AccountStatus.NEEDS_RECONNECT, reason, now)

    def disconnected(self, account: Account, *, now: datetime) -> Account:
        """Disconnected: every token dropped, a tombstone kept, no timer.

        The tokens' times go too: an expiry of a token that no longer exists only
        makes a dead connection look alive in a listing.
        """
        return replace(
            account,
            status=AccountStatus.DISCONNECTED,
            access_token=None,
            refresh_token=None,
            token_expires_at=None,
            reconnect_token_at=None,
            refresh_token_expires_at=None,
            refresh_token_hard_expires_at=None,
            updated_at=now,
        )

    @staticmethod
    def _noted(account: Account, status: AccountStatus, error: str, now: datetime) -> Account:
        return replace(
            account,
            status=status,
            failure_count=account.failure_count + 1,
            last_error=error,
            last_failure_at=now,
            updated_at=now,
        )

    # -- what is shown -------------------------------------------------------------

    @staticmethod
    def shown_status(account: Account, now: datetime) -> AccountStatus:
        """The status as the API shows it (:func:`~qbo_daemon.core.models.shown_status`).

        The row says active until the next attempt writes; once its access token
        is dead, it is shown as expired. The status page's queries read the same rule.
        """
        return shown_status(account.status, account.token_expires_at, now)

    def hard_expiry_soon(self, account: Account, now: datetime) -> bool:
        hard = account.refresh_token_hard_expires_at
        return hard is not None and hard - now <= self.settings.hard_expiry_warning


def valid_for(account: Account, now: datetime) -> timedelta:
    """How long the stored access token still lives (zero when there is none)."""
    if not account.access_token or account.token_expires_at is None:
        return timedelta(0)
    return account.token_expires_at - now


# Intuit counts the 5-year limit down in whole seconds: the instant it names moves by a
# fraction of a second from one answer to the next. Kept as stored, the row (and its
# index) is not rewritten for a limit that did not move.
_HARD_EXPIRY_JITTER = timedelta(seconds=2)


def _same_instant(stored: datetime | None, answered: datetime | None) -> datetime | None:
    """The hard expiry to keep: the stored one unless Intuit's answer moved it."""
    if answered is None:
        return stored
    if stored is not None and abs(answered - stored) <= _HARD_EXPIRY_JITTER:
        return stored
    return answered
