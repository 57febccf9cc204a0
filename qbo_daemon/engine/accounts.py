"""Operations on whole accounts, as the token API and the CLI ask for them.

Listing and showing (with the timer and the status as the engine sees them),
refreshing now, importing existing connections, disconnecting, re-encrypting.
The HTTP handlers call these and never the store or the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import IntuitError, StaleWriteError, StorageError
from qbo_daemon.core.models import Account, AccountStatus, ImportItem, iso
from qbo_daemon.engine.errors import KeyMismatchError, UnavailableError
from qbo_daemon.engine.outcome import OutcomeKind
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.engine.scheduler import Events, Scheduler
from qbo_daemon.engine.triggers import Trigger
from qbo_daemon.engine.verify import refresh_once
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.store.port import AccountStore, AccountWrite, Imported

__all__ = [
    "AccountService",
    "Disconnected",
    "ImportInterruptedError",
    "Imported",
    "RefreshResult",
    "RevokeOutcome",
]

log = structlog.get_logger("qbo_daemon.engine.accounts")


# Items per transaction of an import: a refresh's commit waits behind one chunk at most.
IMPORT_CHUNK = 1000
# Accounts scheduled between two turns of the event loop.
_YIELD_EVERY = 100


class ImportInterruptedError(StorageError):
    """An import stopped part way: ``stored`` (the first items, in order) are stored."""

    def __init__(self, stored: list[Imported], cause: StorageError) -> None:
        super().__init__(
            f"the database failed after {len(stored)} rows were stored "
            f"(they are kept and scheduled); the rest were not stored: {cause}"
        )
        self.stored = stored


class RevokeOutcome(StrEnum):
    REVOKED = "revoked"  # Intuit confirmed
    FAILED = "failed"  # Intuit refused or could not be reached; forgotten here anyway
    NOT_NEEDED = "not_needed"  # no token was left to revoke (already disconnected)


@dataclass(frozen=True, slots=True)
class Disconnected:
    account: Account
    revoke: RevokeOutcome


class RefreshResult(StrEnum):
    """How a refresh asked for on the status page ended, as its notice says."""

    REFRESHED = "refreshed"  # new tokens stored (or the account was reconnected meanwhile)
    FAILED = "failed"  # transient: the timer retries with backoff
    REFUSED = "refused"  # the grant is dead: the user must connect again
    PAUSED = "paused"  # Intuit refuses the daemon's client credentials
    NOT_REFRESHED = "not_refreshed"  # nothing to refresh: no live connection


_REFRESH_RESULTS = {
    OutcomeKind.SUCCESS: RefreshResult.REFRESHED,
    OutcomeKind.CURRENT: RefreshResult.REFRESHED,
    OutcomeKind.TRANSIENT: RefreshResult.FAILED,
    OutcomeKind.INVALID_GRANT: RefreshResult.REFUSED,
    OutcomeKind.REFRESH_TOKEN_EXPIRED: RefreshResult.REFUSED,
    OutcomeKind.INVALID_CLIENT: RefreshResult.PAUSED,
    OutcomeKind.SKIPPED: RefreshResult.NOT_REFRESHED,
}


class AccountService:
    def __init__(
        self,
        storage: AccountStore,
        intuit: IntuitClient,
        scheduler: Scheduler,
        clock: Clock,
        events: Events,
        policy: RefreshPolicy,
    ) -> None:
        self._storage = storage
        self._intuit = intuit
        self._scheduler = scheduler
        self._clock = clock
        self._events = events
        self._policy = policy

    # -- reading -------------------------------------------------------------------

    async def list_accounts(self) -> list[dict[str, Any]]:
        """Every account as the API shows it; never a secret."""
        return [self.describe(account) for account in await self._storage.list_accounts()]

    async def show(self, account_id: str) -> dict[str, Any]:
        """One account as the API shows it; :class:`AccountNotFoundError` if unknown."""
        return self.describe(await self._storage.load(account_id))

    def describe(self, account: Account) -> dict[str, Any]:
        """The account's public fields, its live timer and its status as of now."""
        data = account.public_dict()
        now = self._clock.now()
        data["status"] = self._policy.shown_status(account, now).value
        data["next_refresh_at"] = iso(self._scheduler.next_refresh(account))
        data["hard_expiry_soon"] = self._policy.hard_expiry_soon(account, now)
        return data

    async def exists(self, account_id: str) -> bool:
        return await self._storage.find(account_id) is not None

    async def account_ids(self) -> set[str]:
        return {account.account_id for account in await self._storage.list_accounts()}

    async def existing_ids(self, account_ids: Sequence[str]) -> set[str]:
        """Which of ``account_ids`` are stored (a snapshot: for a dry run, not for writes)."""
        return await self._storage.existing_account_ids(account_ids)

    # -- changing --------------------------------------------------------------------

    async def refresh_now(
        self,
        account_id: str,
        *,
        trigger: Trigger = "api",
        unless_attempted_since: datetime | None = None,
    ) -> Account:
        """Refresh now (single flight); the account after it.

        With ``unless_attempted_since`` (``import --verify``), the first attempt
        that started since then answers, if there was one (:mod:`engine.verify`).
        Raises :class:`AccountNotFoundError`, or :class:`UnavailableError`:
        ``unavailable`` or ``invalid_client`` (retried later by the timer),
        ``needs_reconnect`` or ``disconnected``.
        """
        await self._storage.load(account_id)  # unknown: not found, before anything else
        if unless_attempted_since is not None:
            outcome = await refresh_once(
                self._scheduler,
                self._storage,
                account_id,
                since=unless_attempted_since,
                trigger=trigger,
            )
        else:
            outcome = await self._scheduler.refresh_now(account_id, trigger=trigger)
        if outcome.fresh and outcome.account is not None:
            return outcome.account
        if outcome.kind is OutcomeKind.INVALID_CLIENT:
            raise UnavailableError(
                "invalid_client", "Intuit refused the daemon's client credentials"
            )
        if outcome.kind is OutcomeKind.TRANSIENT:
            raise UnavailableError(
                "unavailable", f"refresh failed, will be retried: {outcome.reason}"
            )
        account = await self._storage.load(account_id)
        if account.status.scheduled:  # replaced meanwhile (reconnected or imported): it is fresh
            return account
        reconnect = f"send the user to the URL from POST /v1/accounts/{account_id}/authorize-url"
        if account.status is AccountStatus.DISCONNECTED:
            raise UnavailableError(
                "disconnected", f"account {account_id!r} is disconnected; {reconnect}"
            )
        raise UnavailableError(
            "needs_reconnect",
            f"the user must reconnect QuickBooks ({account.last_error}): {reconnect}",
        )

    async def refresh(self, account_id: str) -> RefreshResult:
        """Refresh now (single flight) and say how it ended, without raising for a failure."""
        outcome = await self._scheduler.refresh_now(account_id)
        result = _REFRESH_RESULTS[outcome.kind]
        replaced = outcome.kind is OutcomeKind.SKIPPED and outcome.account is not None
        if replaced and outcome.account is not None and outcome.account.status.scheduled:
            return RefreshResult.REFRESHED  # reconnected or imported meanwhile: it is fresh
        return result

    async def import_tokens(
        self, items: Sequence[ImportItem], *, replace_existing: bool = True
    ) -> list[Imported]:
        """Store existing connections and schedule them at once, in order.

        Written in chunks of :data:`IMPORT_CHUNK` items, each its own transaction
        (all or nothing), so a refresh's commit never waits behind a whole import;
        each chunk is scheduled as soon as it is stored. An account whose access
        token is not known to be valid is due now. When a chunk cannot be stored,
        :class:`ImportInterruptedError` says which items were.
        """
        results: list[Imported] = []
        for start in range(0, len(items), IMPORT_CHUNK):
            chunk = items[start : start + IMPORT_CHUNK]
            now = self._clock.now()
            try:
                done = await self._storage.import_connections(
                    [self._policy.imported(item, now=now) for item in chunk],
                    replace_existing=replace_existing,
                )
            except StorageError as exc:
                if not results:
                    raise
                raise ImportInterruptedError(results, exc) from exc
            for number, imported in enumerate(done, 1):
                if imported.account is None:
                    continue
                # A refresh that was in flight for a replaced account discards its result
                # and drops the timer when it ends: let it end before setting the new timer.
                await self._scheduler.wait_idle(imported.account_id)
                self._scheduler.schedule_account(imported.account, trigger="import")
                log.debug("account.imported", account_id=imported.account_id)
                if number % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # let refreshes and requests in between
            results.extend(done)
        now = self._clock.now()
        stored = [r.account for r in results if r.account is not None]
        log.info(
            "import.completed",
            count=len(stored),
            refreshing_now=sum(1 for a in stored if _due(a, now)),
            not_replaced=len(results) - len(stored),
        )
        return results

    async def disconnect(self, account_id: str) -> Disconnected:
        """Revoke at Intuit (best effort), then forget the tokens, keeping a tombstone."""
        self._scheduler.unschedule(account_id)
        # Let a refresh in flight finish first, so the newest token is the one revoked.
        await self._scheduler.wait_idle(account_id)
        while True:
            account = await self._storage.load(account_id)
            if account.status is AccountStatus.DISCONNECTED:
                return Disconnected(account, RevokeOutcome.NOT_NEEDED)
            revoke = await self._revoke(account)
            try:
                gone = self._policy.disconnected(account, now=self._clock.now())
                forgotten = await self._storage.commit(
                    AccountWrite(gone, account.version, tokens=True)
                )
            except StaleWriteError:
                continue
            self._scheduler.unschedule(account_id)
            self._events.emit(
                "account.disconnected", account_id, revoked=revoke is RevokeOutcome.REVOKED
            )
            return Disconnected(forgotten, revoke)

    async def rotate_keys(
        self, batch: int = 500, *, expected_key_id: str | None = None
    ) -> tuple[int, int, str]:
        """Re-encrypt up to ``batch`` rows under the primary key.

        Returns (done now, still to do, the primary key id). With
        ``expected_key_id``, refuses (:class:`KeyMismatchError`) unless that is the
        key the daemon encrypts with.
        """
        primary = self._storage.primary_key_id
        if expected_key_id is not None and expected_key_id != primary:
            raise KeyMismatchError(primary, expected_key_id)
        done, remaining = await self._storage.reencrypt(batch=batch)
        return done, remaining, primary

    async def _revoke(self, account: Account) -> RevokeOutcome:
        token = account.refresh_token or account.access_token
        if not token:
            return RevokeOutcome.NOT_NEEDED
        try:
            tid = await self._intuit.revoke(token)
        except IntuitError as exc:
            log.warning(
                "account.revoke_failed",
                account_id=account.account_id,
                error=str(exc),
                intuit_tid=exc.intuit_tid,
                detail="the tokens are forgotten here anyway",
            )
            return RevokeOutcome.FAILED
        log.info("account.revoked", account_id=account.account_id, intuit_tid=tid)
        return RevokeOutcome.REVOKED


def _due(account: Account, now: datetime) -> bool:
    return account.reconnect_token_at is not None and account.reconnect_token_at <= now
