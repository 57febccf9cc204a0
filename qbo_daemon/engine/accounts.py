"""Operations on whole accounts: import existing connections, disconnect, re-encrypt."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import IntuitError, StaleWriteError, StorageError
from qbo_daemon.core.models import Account, AccountStatus
from qbo_daemon.engine.scheduler import Events, Scheduler
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.store.repository import Imported, ImportItem, Storage

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


class AccountService:
    def __init__(
        self,
        storage: Storage,
        intuit: IntuitClient,
        scheduler: Scheduler,
        clock: Clock,
        events: Events,
        *,
        lead: timedelta,
    ) -> None:
        self._storage = storage
        self._intuit = intuit
        self._scheduler = scheduler
        self._clock = clock
        self._events = events
        self.lead = lead

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
            try:
                done = await self._storage.import_accounts(
                    chunk, lead=self.lead, now=self._clock.now(), replace_existing=replace_existing
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
            account = await self._storage.get_account(account_id)
            if account.status is AccountStatus.DISCONNECTED:
                return Disconnected(account, RevokeOutcome.NOT_NEEDED)
            revoke = await self._revoke(account)
            try:
                forgotten = await self._storage.forget_tokens(account, now=self._clock.now())
            except StaleWriteError:
                continue
            self._scheduler.unschedule(account_id)
            self._events.emit(
                "account.disconnected", account_id, revoked=revoke is RevokeOutcome.REVOKED
            )
            return Disconnected(forgotten, revoke)

    async def rotate_keys(self, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows under the primary key: (done now, still to do)."""
        return await self._storage.reencrypt(batch=batch)

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
