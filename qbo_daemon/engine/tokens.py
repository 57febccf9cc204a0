"""Serving access tokens to the host app.

A valid token is served at once; inside the refresh lead a background
refresh starts as well. Only a token that is expired or about to expire makes
the caller wait, for the single-flight refresh that every asker shares, and
never longer than ``token_wait``. When that refresh fails transiently, a
token that is still valid is served anyway; a dead one is a 503.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.models import Account, AccountStatus
from qbo_daemon.engine.errors import UnavailableError
from qbo_daemon.engine.policy import RefreshPolicy, valid_for
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.store.port import AccountStore


@dataclass(frozen=True, slots=True)
class AccessToken:
    access_token: str
    realm_id: str
    expires_at: datetime


class TokenService:
    def __init__(
        self,
        storage: AccountStore,
        scheduler: Scheduler,
        clock: Clock,
        policy: RefreshPolicy,
    ) -> None:
        self._storage = storage
        self._scheduler = scheduler
        self._clock = clock
        self._policy = policy

    async def get(self, account_id: str) -> AccessToken:
        """A valid access token for ``account_id``.

        Raises :class:`~qbo_daemon.core.errors.AccountNotFoundError` or
        :class:`UnavailableError` (``needs_reconnect``, ``disconnected``,
        ``unavailable``).
        """
        account = await self._storage.load(account_id)
        _check_status(account)
        now = self._clock.now()
        if valid_for(account, now) > self._policy.near_expiry:
            if account.reconnect_token_at is not None and account.reconnect_token_at <= now:
                self._scheduler.refresh_in_background(account_id)
            return _token(account)
        held = self._held(account, now)
        if held is not None:
            return held
        try:
            outcome = await asyncio.wait_for(
                # A refresh that committed since our read answers without a call.
                self._scheduler.refresh_for_token(account),
                self._policy.settings.token_wait.total_seconds(),
            )
        except TimeoutError:
            outcome = None
        if outcome is not None and outcome.fresh and outcome.account is not None:
            return _token(outcome.account)
        # The refresh failed or is slow: the newest stored row decides.
        account = await self._storage.load(account_id)
        _check_status(account)
        if valid_for(account, self._clock.now()) > timedelta(0):
            return _token(account)
        held = self._held(account, self._clock.now())
        if held is not None:
            return held
        reason = "Intuit could not be reached" if outcome else "the refresh is taking too long"
        raise UnavailableError(
            "unavailable",
            f"{reason} and no valid access token is left; retry shortly",
        )

    def _held(self, account: Account, now: datetime) -> AccessToken | None:
        """The new token Intuit gave while the database refuses its write (a full disk).

        No newer one can come before the write lands: waiting for it helps no one.
        """
        held = self._scheduler.held_token(account)
        if held is None or held.token_expires_at <= now:
            return None
        return AccessToken(held.access_token, account.realm_id or "", held.token_expires_at)


def _check_status(account: Account) -> None:
    if account.status is AccountStatus.NEEDS_RECONNECT:
        raise UnavailableError(
            "needs_reconnect",
            f"the QuickBooks connection must be renewed by the user: {account.last_error}. "
            f"Send them to the URL from POST /v1/accounts/{account.account_id}/authorize-url",
        )
    if account.status is AccountStatus.DISCONNECTED or account.refresh_token is None:
        raise UnavailableError(
            "disconnected",
            "the account was disconnected; connect it again through "
            f"POST /v1/accounts/{account.account_id}/authorize-url",
        )


def _token(account: Account) -> AccessToken:
    if not account.access_token or account.token_expires_at is None:
        raise UnavailableError("unavailable", "no access token is stored yet; retry shortly")
    return AccessToken(
        access_token=account.access_token,
        realm_id=account.realm_id or "",
        expires_at=account.token_expires_at,
    )
