"""What the engine knows between database rows: one object per account, and the pause.

:class:`AccountState` is everything the running daemon remembers about one
account that is not in its row: the attempt in flight (every asker awaits
that one task: single flight), how the last attempt ended, the failures in a
row and until when their backoff runs, and new tokens Intuit gave that the
database has not taken yet. :class:`AccountStates` keeps one per account only
while there is something to remember, so memory follows the accounts in
trouble or in flight, not all accounts.

:class:`ClientPause` is the ``invalid_client`` pause, one explicit state
(:class:`PauseState`) for every account at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from qbo_daemon.core.models import Account, TokenSet
from qbo_daemon.engine.outcome import Outcome


@dataclass(frozen=True, slots=True)
class HeldTokens:
    """Tokens Intuit gave that the database refused; they belong to the row they came from."""

    replaces: str | None  # the refresh token of that row
    tokens: TokenSet


@dataclass(slots=True)
class AccountState:
    """The runtime state of one account."""

    attempt: asyncio.Task[Outcome] | None = None
    last: Outcome | None = None
    started: float | None = None  # monotonic time the latest attempt started
    failures: int = 0  # failed attempts in a row
    backoff_until: datetime | None = None  # the failure's timed retry (backoff, Retry-After)
    retry_after_until: datetime | None = None  # Intuit's Retry-After, as a wall time
    held: HeldTokens | None = None
    hard_expiry_warned: bool = False

    @property
    def idle(self) -> bool:
        """Nothing here that the row does not say: the state may be forgotten."""
        return (
            self.attempt is None
            and self.failures == 0
            and self.held is None
            and not self.hard_expiry_warned
        )

    def backing_off(self, now: datetime) -> bool:
        """Whether a failure's retry is timed in the future."""
        return self.failures > 0 and self.backoff_until is not None and self.backoff_until > now

    def may_retry_early(self, now: datetime, monotonic: float, every: float) -> bool:
        """Whether a reader of a dead token may start an attempt before the timed retry.

        Once Intuit's ``Retry-After`` has passed, and at most one attempt per
        ``every`` seconds: the app is down until a refresh lands, but a reader
        polling its token must not make a retry storm.
        """
        if self.retry_after_until is not None and now < self.retry_after_until:
            return False
        return self.started is None or monotonic - self.started >= every

    def recovered(self) -> int:
        """Forget the failures (the account is fine again); how many there were."""
        failures, self.failures = self.failures, 0
        self.backoff_until = self.retry_after_until = None
        return failures


class AccountStates:
    """The :class:`AccountState` of every account that has one."""

    def __init__(self) -> None:
        self._states: dict[str, AccountState] = {}
        self._attempts = 0
        self._holding = 0

    def get(self, account_id: str) -> AccountState | None:
        return self._states.get(account_id)

    def of(self, account_id: str) -> AccountState:
        """The account's state, created empty if it has none."""
        state = self._states.get(account_id)
        if state is None:
            state = self._states[account_id] = AccountState()
        return state

    def forget_if_idle(self, account_id: str) -> None:
        state = self._states.get(account_id)
        if state is not None and state.idle:
            del self._states[account_id]

    # -- attempts --------------------------------------------------------------------

    def began(self, account_id: str, task: asyncio.Task[Outcome]) -> None:
        self.of(account_id).attempt = task
        self._attempts += 1

    def ended(self, account_id: str, task: asyncio.Task[Outcome]) -> None:
        state = self._states.get(account_id)
        if state is None or state.attempt is not task:
            return
        state.attempt = None
        self._attempts -= 1
        if not task.cancelled() and task.exception() is None:
            state.last = task.result()
        self.forget_if_idle(account_id)

    @property
    def attempts(self) -> int:
        """Attempts in flight."""
        return self._attempts

    def in_flight(self) -> Iterator[asyncio.Task[Outcome]]:
        for state in self._states.values():
            if state.attempt is not None:
                yield state.attempt

    # -- held tokens -----------------------------------------------------------------

    def hold(self, account_id: str, held: HeldTokens) -> None:
        state = self.of(account_id)
        if state.held is None:
            self._holding += 1
        state.held = held

    def release(self, account_id: str) -> bool:
        """Drop the tokens held for the account; whether there were any."""
        state = self._states.get(account_id)
        if state is None or state.held is None:
            return False
        state.held = None
        self._holding -= 1
        self.forget_if_idle(account_id)
        return True

    @property
    def holding(self) -> bool:
        """Whether any account's new tokens wait in memory for the database."""
        return self._holding > 0

    def held_for(self, account: Account) -> TokenSet | None:
        """The tokens held for ``account``, only if they came from its current row.

        After a reconnect or import they are not its.
        """
        state = self._states.get(account.account_id)
        if state is None or state.held is None or state.held.replaces != account.refresh_token:
            return None
        return state.held.tokens


class PauseState(StrEnum):
    RUNNING = "running"  # Intuit accepts our client: refreshes go out
    PAUSED = "paused"  # Intuit refused our client (invalid_client): no call before ``until``
    PROBING = "probing"  # one attempt tries the credentials; no other call meanwhile


class ClientPause:
    """The ``invalid_client`` pause.

    A configuration fault of every account, so no account is marked: refreshes
    stop until ``until`` (wall time), then one attempt probes. Intuit accepting
    our client (any success, or ``invalid_grant``, a refusal of the grant
    itself) ends it; the probe refused again pauses for another interval; a
    probe that proves nothing (an outage, an account that needed no call) hands
    the probe to the next due account.
    """

    def __init__(self) -> None:
        self.state = PauseState.RUNNING
        self.until = 0.0
        self._probe: str | None = None

    def allows_call(self, now: float) -> bool:
        """Whether an attempt may call Intuit now."""
        if self.state is PauseState.RUNNING:
            return True
        return self.state is PauseState.PAUSED and now >= self.until

    def starting(self, account_id: str) -> None:
        """An attempt starts: while paused, it is the probe."""
        if self.state is PauseState.PAUSED:
            self.state = PauseState.PROBING
            self._probe = account_id

    def refused(self, now: float, retry: float) -> bool:
        """Intuit refused our client: pause for ``retry`` seconds. Whether it was running."""
        first = self.state is PauseState.RUNNING
        self.state, self.until, self._probe = PauseState.PAUSED, now + retry, None
        return first

    def accepted(self) -> bool:
        """Intuit accepted our client: run. Whether a pause ended."""
        ended = self.state is not PauseState.RUNNING
        self.state, self._probe = PauseState.RUNNING, None
        return ended

    def inconclusive(self, account_id: str, now: float, retry: float | None) -> None:
        """The probe ended without a word on the credentials.

        With ``retry`` (Intuit did not answer), the next probe waits that long;
        without it the next due account probes at once.
        """
        if self.state is PauseState.PROBING and self._probe == account_id:
            self.state, self._probe = PauseState.PAUSED, None
            if retry is not None:
                self.until = now + retry

    def resume(self, now: float) -> None:
        """Credentials changed (a reload): the next due account probes now."""
        if self.state is not PauseState.RUNNING:
            self.until = now
