"""One refresh attempt of one account, from reading the row to the durable commit.

The :class:`Refresher` knows nothing of timers: the scheduler decides when,
and makes sure only one attempt per account is in flight. An attempt:

1. takes a slot of the global concurrency limit, then reads the account (the
   newest persisted refresh token, never an older one);
2. gives up without calling Intuit when the refresh token is past its expiry
   or its 5-year hard expiry;
3. calls Intuit, and gives the slot back as soon as Intuit has answered;
4. on success persists tokens, times and the attempt in one compare-and-swap
   transaction before reporting success. If the database write fails after
   Intuit answered, the new tokens stay in memory and the write is retried
   until it lands (logged as critical): Intuit may already have rotated the
   refresh token, and the one on disk may be dead;
5. on failure records it and classifies it for the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import (
    IntuitError,
    InvalidClientError,
    InvalidGrantError,
    StaleWriteError,
    StorageError,
    TransientIntuitError,
)
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import Account, TokenSet
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.intuit.client import IntuitClient, TokenResult
from qbo_daemon.store.port import AccountStore, AccountWrite, Attempt

log = structlog.get_logger("qbo_daemon.refresh")

# Backoff between retries of a database write that failed after Intuit answered.
# Capped short: a retry costs one failed transaction, while the tokens it holds
# may be the only live ones, and a shutdown's drain must see at least one retry.
_PERSIST_RETRY_INITIAL = 0.5
_PERSIST_RETRY_MAX = 5.0


class OutcomeKind(StrEnum):
    SUCCESS = "success"
    TRANSIENT = "transient"
    INVALID_GRANT = "invalid_grant"
    INVALID_CLIENT = "invalid_client"
    REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105 - a name, not a secret
    SKIPPED = "skipped"  # the account is gone, disconnected or already needs a reconnect


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    account: Account | None
    error: IntuitError | None = None
    message: str | None = None
    duration: float | None = None  # seconds the Intuit call took
    intuit_tid: str | None = None

    @property
    def retry_after(self) -> float | None:
        if isinstance(self.error, TransientIntuitError):
            return self.error.retry_after
        return None


class Refresher:
    def __init__(
        self,
        storage: AccountStore,
        intuit: IntuitClient,
        clock: Clock,
        metrics: Metrics,
        policy: RefreshPolicy,
        *,
        concurrency: int,
    ) -> None:
        self._storage = storage
        self._intuit = intuit
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._slots = asyncio.Semaphore(concurrency)
        self.in_flight = 0
        # New tokens held in memory while their write is retried, per account, with the
        # refresh token they replace (the row they belong to).
        self._held: dict[str, tuple[str | None, TokenSet]] = {}

    @property
    def persist_failing(self) -> bool:
        """Whether new tokens are held in memory because the database refuses them."""
        return bool(self._held)

    def held_tokens(self, account: Account) -> TokenSet | None:
        """The tokens held for ``account`` while the database refuses them, if any.

        Only for the row they were refreshed from: after a reconnect they are not its.
        """
        held = self._held.get(account.account_id)
        if held is None or held[0] != account.refresh_token:
            return None
        return held[1]

    def set_concurrency(self, concurrency: int) -> None:
        """Takes effect for attempts that start from now on."""
        self._slots = asyncio.Semaphore(concurrency)

    async def attempt(self, account_id: str, *, due: datetime | None) -> Outcome:
        """Refresh ``account_id`` once. ``due`` is when the timer wanted it (for lateness)."""
        slots = self._slots
        async with slots:
            # Read the row only once a slot is ours: in a storm the wait can be long, and
            # a reconnect or import meanwhile must not make us present an older token.
            account = await self._storage.find(account_id)
            if account is None:
                return Outcome(OutcomeKind.SKIPPED, None, message="no such account")
            if not account.status.scheduled or account.refresh_token is None:
                return Outcome(OutcomeKind.SKIPPED, account, message=f"account is {account.status}")
            now = self._clock.now()
            dead = self._policy.refresh_token_death(account, now)
            if dead is not None:
                attempt = Attempt(account_id, now, "expired", 0.0, error=dead)
                updated = await self._record_failure(
                    account, lambda a: self._policy.dead(a, dead, now=now), attempt
                )
                if updated is None:
                    return await self._replaced(account_id)
                return Outcome(OutcomeKind.REFRESH_TOKEN_EXPIRED, updated, message=dead)

            started_wall = self._clock.now()
            if due is not None:
                self._metrics.refresh_lateness((started_wall - due).total_seconds())
            started = self._clock.monotonic()
            self.in_flight += 1
            self._metrics.set_refreshing(self.in_flight)
            try:
                result: TokenResult | IntuitError = await self._intuit.refresh(
                    account.refresh_token
                )
            except IntuitError as error:
                result = error
            finally:
                self.in_flight -= 1
                self._metrics.set_refreshing(self.in_flight)
            duration = self._clock.monotonic() - started
        # The slot limits calls to Intuit; the write that follows waits on the database,
        # and holding the slot through it would leave Intuit's capacity idle.
        if isinstance(result, IntuitError):
            return await self._failed(account, result, started_wall, duration)
        saved = await self._persist(account, result, started_wall, duration)
        self._metrics.refresh_attempt("success", duration)
        if saved is None:
            return await self._replaced(account_id)
        return Outcome(OutcomeKind.SUCCESS, saved, duration=duration, intuit_tid=result.intuit_tid)

    async def _replaced(self, account_id: str) -> Outcome:
        """The row was reconnected, imported or disconnected during the attempt: it wins.

        The outcome carries the current row, so the scheduler keeps (or drops) the
        timer that row asks for instead of acting on this attempt's result.
        """
        current = await self._storage.find(account_id)
        return Outcome(OutcomeKind.SKIPPED, current, message="account replaced during refresh")

    async def _persist(
        self, account: Account, result: TokenResult, started: datetime, duration: float
    ) -> Account | None:
        """Write the new tokens durably; retry forever on storage failure.

        Returns ``None`` when the row was replaced meanwhile (reconnected,
        imported or disconnected): those newer credentials win.
        """
        delay = _PERSIST_RETRY_INITIAL
        while True:
            attempt = Attempt(
                account_id=account.account_id,
                started_at=started,
                outcome="success",
                duration_ms=duration * 1000,
                intuit_tid=result.intuit_tid,
            )
            try:
                try:
                    updated = await self._storage.commit(
                        self._refreshed(account, result.tokens, attempt)
                    )
                except StaleWriteError:
                    current = await self._still_ours(account)
                    if current is None:
                        self._held.pop(account.account_id, None)
                        log.warning(
                            "refresh.discarded",
                            reason="the account was reconnected, imported or disconnected "
                            "meanwhile",
                            intuit_tid=result.intuit_tid,
                        )
                        return None
                    # Only bookkeeping changed (a key rotation, a failure note): write again.
                    account = current
                    continue
            except StorageError as exc:  # the write, or the re-read after a stale write
                self._held[account.account_id] = (account.refresh_token, result.tokens)
                log.critical(
                    "refresh.persist_failed",
                    error=str(exc),
                    retry_in=delay,
                    intuit_tid=result.intuit_tid,
                    detail="new tokens are held in memory and the write is retried",
                )
                try:
                    await self._clock.sleep(delay)
                except asyncio.CancelledError:
                    # The shutdown drain ran out: one last write, or the tokens are gone.
                    await self._last_write(account, result, attempt)
                    raise
                delay = min(delay * 2, _PERSIST_RETRY_MAX)
                continue
            if self._held.pop(account.account_id, None) is not None:
                log.warning("refresh.persist_recovered", intuit_tid=result.intuit_tid)
            return updated

    async def _last_write(self, account: Account, result: TokenResult, attempt: Attempt) -> None:
        self._held.pop(account.account_id, None)
        try:
            await self._storage.commit(self._refreshed(account, result.tokens, attempt))
        except StorageError as exc:
            log.critical(
                "refresh.tokens_lost",
                error=str(exc),
                intuit_tid=result.intuit_tid,
                detail="stopped while the database refused the new tokens; if Intuit rotated "
                "the refresh token, the account must be reconnected",
            )
        else:
            log.warning("refresh.persist_recovered", intuit_tid=result.intuit_tid, on="shutdown")

    async def _failed(
        self, account: Account, error: IntuitError, started: datetime, duration: float
    ) -> Outcome:
        now = self._clock.now()
        if isinstance(error, InvalidGrantError):
            kind, outcome = OutcomeKind.INVALID_GRANT, "invalid_grant"
        elif isinstance(error, InvalidClientError):
            kind, outcome = OutcomeKind.INVALID_CLIENT, "invalid_client"
        else:
            kind, outcome = OutcomeKind.TRANSIENT, "transient"
        self._metrics.refresh_attempt(outcome, duration)
        self._metrics.intuit_error(error.code or outcome)
        attempt = Attempt(
            account_id=account.account_id,
            started_at=started,
            outcome=outcome,
            duration_ms=duration * 1000,
            intuit_tid=error.intuit_tid,
            error=str(error),
        )
        if kind is OutcomeKind.INVALID_CLIENT:
            # Our credentials are wrong, not this account: mark nothing.
            await self._storage.record_attempt(attempt)
            return Outcome(kind, account, error)
        updated = await self._record_failure(
            account, lambda a: self._policy.failed(a, error, now=now), attempt
        )
        if updated is None:
            # The failure was of tokens that are no longer this account's.
            return await self._replaced(account.account_id)
        return Outcome(kind, updated, error, duration=duration, intuit_tid=error.intuit_tid)

    def _refreshed(self, account: Account, tokens: TokenSet, attempt: Attempt) -> AccountWrite:
        updated = self._policy.refreshed(account, tokens, now=self._clock.now())
        return AccountWrite(updated, account.version, tokens=True, attempt=attempt)

    async def _record_failure(
        self, account: Account, decide: Callable[[Account], Account], attempt: Attempt
    ) -> Account | None:
        """Note the failure; ``None`` when the row was replaced meanwhile (nothing noted)."""
        for _ in range(3):
            try:
                return await self._storage.commit(
                    AccountWrite(decide(account), account.version, tokens=False, attempt=attempt)
                )
            except StaleWriteError:
                current = await self._still_ours(account)
                if current is None:
                    return None
                account = current
        return account

    async def _still_ours(self, account: Account) -> Account | None:
        """After a stale write: the current row if it still holds our refresh token.

        ``None`` when the connection was replaced (reconnected, imported or
        disconnected): the newer credentials win. Otherwise only bookkeeping
        changed (a key rotation, a failure note) and the write may be redone.
        """
        current = await self._storage.find(account.account_id)
        if current is None or current.refresh_token != account.refresh_token:
            return None
        return current
