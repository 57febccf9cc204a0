"""One refresh attempt of one account: load once, call Intuit once, commit once.

The :class:`Refresher` knows nothing of timers: the scheduler decides when,
and makes sure only one attempt per account is in flight. :meth:`Refresher.attempt`
reads top to bottom:

1. **Load** the row once, inside a slot of the Intuit limit (``[refresh]
   concurrency``): the newest persisted refresh token, never an older one,
   even after a long wait for the slot. With several daemons on PostgreSQL
   the load is a claim (``store.port.ClaimStore``): the row comes back only
   to the one node that may call Intuit for it now; another node holding it
   ends the attempt as :attr:`OutcomeKind.ELSEWHERE`, and an asker then
   follows that node's commit (:meth:`Refresher.follow`).
2. **Decide** from that row whether to call at all: not for an account that is
   gone, disconnected or needs a reconnect; not when it changed since the
   asker read it and is fresh already; not with a refresh token past its
   expiry (the account then needs a reconnect).
3. **Call** Intuit once; the slot is given back as soon as it answered.
4. **Commit** once what the policy makes of the answer, as a compare-and-swap
   on the version loaded in step 1, with the attempt's row. A conflict ends in
   one explicit re-decision (:meth:`Refresher._commit`): if the row holds other
   tokens meanwhile (a reconnect, an import, a disconnect, another daemon's
   refresh) they win; if only bookkeeping moved (a key rotation, a failure
   note) the same decision is made again from the current row and committed.
   The commit ends the claim.

After a committed success, an account whose company Intuit has not confirmed
yet is checked again (:meth:`RealmCheck.after_refresh
<qbo_daemon.engine.realm_check.RealmCheck.after_refresh>`); refused, the
attempt ends like a dead grant.

New tokens are durable before success is reported. If the database refuses
them, they are held in memory (:class:`~qbo_daemon.engine.state.AccountStates`)
and the write is retried until it lands: Intuit may already have rotated the
refresh token, and the one on disk may be dead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

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
from qbo_daemon.engine.cluster import LEASE_MARGIN, TAKEOVER_GRACE, Cluster
from qbo_daemon.engine.outcome import Outcome, OutcomeKind
from qbo_daemon.engine.policy import RefreshPolicy, valid_for
from qbo_daemon.engine.realm_check import RealmCheck
from qbo_daemon.engine.state import AccountStates, HeldTokens
from qbo_daemon.intuit.client import IntuitClient, TokenResult
from qbo_daemon.store.port import AccountStore, AccountWrite, Attempt, Busy, Claim, NotDue

log = structlog.get_logger("qbo_daemon.refresh")

# Backoff between retries of a database write that failed after Intuit answered.
# Capped short: a retry costs one failed transaction, while the tokens it holds
# may be the only live ones, and a shutdown's drain must see at least one retry.
_PERSIST_RETRY_INITIAL = 0.5
_PERSIST_RETRY_MAX = 5.0

# A write the engine decides from a row: the same decision, made again from a newer row.
Decide = Callable[[Account], AccountWrite]


@dataclass(frozen=True, slots=True)
class Call:
    """One call to Intuit: its answer, when it was sent, how long it took."""

    result: TokenResult | IntuitError
    started: datetime
    duration: float


@dataclass(frozen=True, slots=True)
class Replaced:
    """A commit gave way: the connection changed meanwhile, and ``current`` is the row now."""

    current: Account | None


class Refresher:
    def __init__(
        self,
        storage: AccountStore,
        intuit: IntuitClient,
        clock: Clock,
        metrics: Metrics,
        policy: RefreshPolicy,
        states: AccountStates,
        *,
        concurrency: int,
        realm_check: RealmCheck | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self._storage = storage
        # Several daemons on one database: every call to Intuit is made under a claim.
        self._cluster = cluster
        # Re-checks an unverified realm after each committed refresh (engine.realm_check).
        self.realm_check = realm_check
        self._intuit = intuit
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._states = states
        self._slots = asyncio.Semaphore(concurrency)
        self.calling = 0  # calls to Intuit in flight
        metrics.count_refreshing(lambda: self.calling)

    def set_concurrency(self, concurrency: int) -> None:
        """Takes effect for attempts that start from now on."""
        self._slots = asyncio.Semaphore(concurrency)

    async def attempt(
        self, account_id: str, *, due: datetime | None, seen_version: int | None = None
    ) -> Outcome:
        """Refresh ``account_id`` once.

        ``due`` is when the timer wanted it (for the lateness metric).
        ``seen_version`` is the version an asker saw too old to serve: if the
        row moved on since and is fresh, no call is made (:attr:`OutcomeKind.CURRENT`).
        """
        busy: Busy | None = None
        async with self._slots:
            loaded = await self._load(account_id, due)  # load once (and claim)
            if isinstance(loaded, Busy):
                busy = loaded
            elif isinstance(loaded, Outcome):
                return loaded
            else:
                account, claim, claimed_at = loaded
                now = self._clock.now()
                refresh_token = account.refresh_token
                if not account.status.scheduled or refresh_token is None:
                    await self._release(claim)
                    return Outcome(
                        OutcomeKind.SKIPPED, account, message=f"account is {account.status}"
                    )
                if self._refreshed_since(account, seen_version, now):
                    await self._release(claim)
                    return Outcome(OutcomeKind.CURRENT, account, message="refreshed meanwhile")
                if claim is not None and not self._lease_left(claim, claimed_at):
                    await self._release(claim)
                    return Outcome(
                        OutcomeKind.ELSEWHERE,
                        account,
                        message="the claim came too late to call Intuit in time",
                        retry_in=0.0,
                    )
                dead = self._policy.refresh_token_death(account, now)
                call = None if dead is not None else await self._call(refresh_token, due)
        if busy is not None:
            return Outcome(
                OutcomeKind.ELSEWHERE,
                busy.account,
                message=f"node {busy.owner} is refreshing it",
                retry_in=busy.remaining,
            )
        if dead is not None:
            return await self._give_up(account, dead, now, claim)
        assert call is not None
        if isinstance(call.result, IntuitError):
            return await self._failed(account, call.result, call, claim)
        return await self._succeeded(account, call.result, call, claim)

    # -- several daemons -------------------------------------------------------------

    @property
    def lease(self) -> float:
        """Seconds a claim lasts: the Intuit timeout, and a margin to start and to commit."""
        return self._intuit.config.timeout.total_seconds() + 2 * LEASE_MARGIN

    async def _load(
        self, account_id: str, due: datetime | None
    ) -> tuple[Account, Claim | None, float] | Busy | Outcome:
        """The row to decide from; with several daemons, claimed for this attempt.

        A timer's claim (``due`` set) is refused for a row another node has
        refreshed since: it is not due any more.
        """
        began = self._clock.monotonic()
        try:
            if self._cluster is None:
                account = await self._storage.find(account_id)
                if account is None:
                    return Outcome(OutcomeKind.SKIPPED, None, message="no such account")
                return account, None, began
            result = await self._cluster.claims.claim(
                account_id,
                lease=self.lease,
                due_by=self._clock.now() if due is not None else None,
            )
        except StorageError as exc:
            # Nothing was asked of Intuit: an outage of the database, retried with backoff.
            return Outcome(
                OutcomeKind.TRANSIENT, None, message=f"the database is unavailable: {exc}"
            )
        if result is None:
            return Outcome(OutcomeKind.SKIPPED, None, message="no such account")
        if isinstance(result, NotDue):
            self._metrics.claim("not_due")
            return Outcome(OutcomeKind.CURRENT, result.account, message="refreshed by another node")
        if isinstance(result, Busy):
            self._metrics.claim("busy")
            return result
        self._metrics.claim("claimed")
        return result.account, result.claim, began

    def _lease_left(self, claim: Claim, claimed_at: float) -> bool:
        """Whether the claim still has the Intuit timeout and a margin left."""
        left = claim.lease - (self._clock.monotonic() - claimed_at)
        return left >= self._intuit.config.timeout.total_seconds() + LEASE_MARGIN

    async def _release(self, claim: Claim | None) -> None:
        if claim is not None and self._cluster is not None:
            try:
                await self._cluster.claims.release(claim)
            except StorageError as exc:  # the lease runs out by itself
                log.warning("claim.release_failed", error=str(exc))

    async def follow(self, outcome: Outcome) -> Outcome:
        """An asker's attempt found another node refreshing: wait for that node's commit.

        Single flight across nodes: no second call is made; the answer is the
        row that node commits (announced by the database), or ``outcome`` if
        none comes before its claim runs out.
        """
        account = outcome.account
        if outcome.kind is not OutcomeKind.ELSEWHERE or account is None or self._cluster is None:
            return outcome
        with self._cluster.watching(account.account_id) as changed:
            current = await self._storage.find(account.account_id)
            if current is not None and current.version == account.version:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout((outcome.retry_in or 0.0) + LEASE_MARGIN):
                        await changed.wait()
                current = await self._storage.find(account.account_id)
        if (
            current is not None
            and current.version > account.version
            and valid_for(current, self._clock.now()) > self._policy.near_expiry
        ):
            return Outcome(OutcomeKind.CURRENT, current, message="refreshed by another node")
        return outcome

    # -- the steps -------------------------------------------------------------------

    def _refreshed_since(self, account: Account, seen_version: int | None, now: datetime) -> bool:
        """Whether the row moved on since the asker saw it, to a token worth serving."""
        return (
            seen_version is not None
            and account.version > seen_version
            and valid_for(account, now) > self._policy.near_expiry
        )

    async def _call(self, refresh_token: str, due: datetime | None) -> Call:
        started = self._clock.now()
        if due is not None:
            self._metrics.refresh_lateness((started - due).total_seconds())
        began = self._clock.monotonic()
        self.calling += 1
        try:
            result: TokenResult | IntuitError = await self._intuit.refresh(refresh_token)
        except IntuitError as error:
            result = error
        finally:
            self.calling -= 1
        return Call(result, started, self._clock.monotonic() - began)

    async def _succeeded(
        self, account: Account, result: TokenResult, call: Call, claim: Claim | None
    ) -> Outcome:
        attempt = Attempt(
            account_id=account.account_id,
            started_at=call.started,
            outcome="success",
            duration_ms=call.duration * 1000,
            intuit_tid=result.intuit_tid,
        )

        def decide(row: Account) -> AccountWrite:
            refreshed = self._policy.refreshed(row, result.tokens, now=self._clock.now())
            return AccountWrite(refreshed, row.version, tokens=True, attempt=attempt, claim=claim)

        try:
            saved = await self._commit(account, decide, result.tokens)
        except StorageError as exc:
            saved = await self._persist(account, result, decide, exc)
        else:
            self._landed(account, result)
        self._metrics.refresh_attempt("success", call.duration)
        if isinstance(saved, Replaced):
            if claim is not None:
                # Several daemons: another may have refreshed it while this one was
                # paused or cut off. Its tokens are newer; these are kept nowhere.
                log.error(
                    "refresh.superseded",
                    intuit_tid=result.intuit_tid,
                    detail="the row holds newer credentials (another daemon's refresh, a "
                    "reconnect, an import or a disconnect) than the ones this answer "
                    "was for; the answer is dropped and its tokens kept nowhere",
                )
            else:
                self._discarded(result.intuit_tid, answer="success")
            return _replaced(saved)
        if self.realm_check is not None:
            checked = await self.realm_check.after_refresh(saved)
            if checked.refused is not None:
                # The tokens are not the stored company's: as final as a dead grant.
                return Outcome(
                    OutcomeKind.INVALID_GRANT,
                    checked.account,
                    message=checked.refused,
                    duration=call.duration,
                    intuit_tid=result.intuit_tid,
                )
            saved = checked.account
        return Outcome(
            OutcomeKind.SUCCESS, saved, duration=call.duration, intuit_tid=result.intuit_tid
        )

    async def _failed(
        self, account: Account, error: IntuitError, call: Call, claim: Claim | None
    ) -> Outcome:
        # Another node's call with this refresh token never answered into the database:
        # it may have rotated the token, and that node may yet store it. Until new
        # tokens are stored, every failure note keeps that mark.
        keep_abandoned = _abandoned_recently(claim)
        if isinstance(error, InvalidGrantError) and keep_abandoned:
            error = TransientIntuitError(
                f"{error} (after another node's unanswered call; not final for "
                f"{TAKEOVER_GRACE:.0f} s)",
                status=error.status,
                code=error.code,
                intuit_tid=error.intuit_tid,
            )
        if isinstance(error, InvalidGrantError):
            kind, outcome = OutcomeKind.INVALID_GRANT, "invalid_grant"
        elif isinstance(error, InvalidClientError):
            kind, outcome = OutcomeKind.INVALID_CLIENT, "invalid_client"
        else:
            kind, outcome = OutcomeKind.TRANSIENT, "transient"
        self._metrics.refresh_attempt(outcome, call.duration)
        self._metrics.intuit_error(error.code or outcome)
        attempt = Attempt(
            account_id=account.account_id,
            started_at=call.started,
            outcome=outcome,
            duration_ms=call.duration * 1000,
            intuit_tid=error.intuit_tid,
            error=str(error),
        )
        if kind is OutcomeKind.INVALID_CLIENT:
            # Our credentials are wrong, not this account: mark nothing.
            await self._storage.record_attempt(attempt)
            await self._release(claim)
            return Outcome(kind, account, error)
        if kind is OutcomeKind.INVALID_GRANT:
            # Before calling the connection dead, look again: a refresh token that changed
            # since it was loaded (a reconnect, an import, another writer) means this was a
            # race, and the current row decides.
            current = await self._storage.find(account.account_id)
            if current is None or current.refresh_token != account.refresh_token:
                self._discarded(error.intuit_tid, answer="invalid_grant")
                return _replaced(Replaced(current))
            account = current
        now = self._clock.now()

        def decide(row: Account) -> AccountWrite:
            failed = self._policy.failed(row, error, now=now)
            return AccountWrite(
                failed,
                row.version,
                tokens=False,
                attempt=attempt,
                claim=claim,
                keep_abandoned=keep_abandoned,
            )

        noted = await self._commit(account, decide)
        if isinstance(noted, Replaced):
            # The failure was of tokens that are no longer this account's.
            self._discarded(error.intuit_tid, answer=outcome)
            return _replaced(noted)
        return Outcome(kind, noted, error, duration=call.duration, intuit_tid=error.intuit_tid)

    async def _give_up(
        self, account: Account, reason: str, now: datetime, claim: Claim | None
    ) -> Outcome:
        """The refresh token is dead: the account needs a reconnect, without asking Intuit."""
        attempt = Attempt(account.account_id, now, "expired", 0.0, error=reason)

        def decide(row: Account) -> AccountWrite:
            dead = self._policy.dead(row, reason, now=now)
            return AccountWrite(dead, row.version, tokens=False, attempt=attempt, claim=claim)

        noted = await self._commit(account, decide)
        if isinstance(noted, Replaced):
            return _replaced(noted)
        return Outcome(OutcomeKind.REFRESH_TOKEN_EXPIRED, noted, message=reason)

    # -- committing ------------------------------------------------------------------

    async def _commit(
        self, account: Account, decide: Decide, answer: TokenSet | None = None
    ) -> Account | Replaced:
        """Commit the decision made from ``account``; on a conflict, re-decide once.

        The re-decision reads the row again: other tokens (a reconnect, an
        import, a disconnect, or another daemon's refresh) mean the row holds
        newer credentials, and they win (:class:`Replaced`, nothing written); the
        same ones mean only bookkeeping moved (a failure note, a key rotation),
        and the decision is made again from the current row. A second conflict
        raises :class:`StaleWriteError`.
        """
        try:
            return await self._storage.commit(decide(account))
        except StaleWriteError:
            current = await self._storage.find(account.account_id)
            if answer is not None and current is not None and _holds(current, answer):
                # An earlier try landed though its reply was lost (the connection dropped).
                return current
            if (
                current is None
                or current.refresh_token != account.refresh_token
                or current.access_token != account.access_token
            ):
                return Replaced(current)
            return await self._storage.commit(decide(current))

    async def _persist(
        self, account: Account, result: TokenResult, decide: Decide, error: StorageError
    ) -> Account | Replaced:
        """The database refused new tokens (``error``): hold them and retry until they land."""
        delay = _PERSIST_RETRY_INITIAL
        while True:
            self._held(account, result.tokens, error, delay, result.intuit_tid)
            try:
                await self._clock.sleep(delay)
            except asyncio.CancelledError:
                # The shutdown drain ran out: one last write, or the tokens are gone.
                await self._last_write(account, result, decide)
                raise
            delay = min(delay * 2, _PERSIST_RETRY_MAX)
            try:
                saved = await self._commit(account, decide, result.tokens)
            except StorageError as exc:
                error = exc
                continue
            self._landed(account, result)
            return saved

    def _landed(self, account: Account, result: TokenResult) -> None:
        """New tokens are on disk: any held in memory for the account are let go."""
        if self._states.release(account.account_id):
            log.warning("refresh.persist_recovered", intuit_tid=result.intuit_tid)

    def _held(
        self,
        account: Account,
        tokens: TokenSet,
        error: StorageError,
        retry_in: float,
        intuit_tid: str | None,
    ) -> None:
        self._states.hold(account.account_id, HeldTokens(account.refresh_token, tokens))
        log.critical(
            "refresh.persist_failed",
            error=str(error),
            retry_in=retry_in,
            intuit_tid=intuit_tid,
            detail="new tokens are held in memory and the write is retried",
        )

    async def _last_write(self, account: Account, result: TokenResult, decide: Decide) -> None:
        self._states.release(account.account_id)
        try:
            await self._commit(account, decide, result.tokens)
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

    def _discarded(self, intuit_tid: str | None, *, answer: str) -> None:
        """Intuit's answer belongs to a connection that was replaced during the call."""
        log.warning(
            "refresh.discarded",
            answer=answer,
            reason="the account was reconnected, imported or disconnected meanwhile",
            intuit_tid=intuit_tid,
        )


def _holds(row: Account, tokens: TokenSet) -> bool:
    """Whether ``row`` already stores ``tokens``."""
    return row.access_token == tokens.access_token and row.refresh_token == tokens.refresh_token


def _abandoned_recently(claim: Claim | None) -> bool:
    return (
        claim is not None
        and claim.abandoned_for is not None
        and claim.abandoned_for < TAKEOVER_GRACE
    )


def _replaced(replaced: Replaced) -> Outcome:
    """The row was reconnected, imported or disconnected during the attempt: it wins.

    The outcome carries the current row, so the scheduler keeps (or drops) the
    timer that row asks for instead of acting on this attempt's result.
    """
    return Outcome(OutcomeKind.SKIPPED, replaced.current, message="account replaced during refresh")
