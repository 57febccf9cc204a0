"""Verifying an import: each imported account refreshed once, through the single flight.

An import whose access token is not known to be valid leaves the account due
at once, and the scheduler refreshes it within moments (trigger ``import``).
``import --verify`` then asks ``POST /v1/accounts/{id}/refresh`` with
``unless_attempted_since`` set to when the import began, and
:func:`refresh_once` answers with the first attempt made since then: the one
in flight (joined, as every asker joins it), one that already ran (read from
the attempts table), or, when there was none yet, a new one. So a verified
account is refreshed exactly once, whoever got there first, and at the
daemon's normal concurrency.
"""

from __future__ import annotations

from datetime import datetime

from qbo_daemon.core.errors import AccountNotFoundError
from qbo_daemon.engine.outcome import Outcome, OutcomeKind
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.engine.triggers import Trigger
from qbo_daemon.store.port import AccountStore, Attempt

# Attempts read back: a verify follows its import by moments, when only a first attempt
# and perhaps a retry or two can have run.
_RECENT_ATTEMPTS = 20
# How an attempt recorded in the attempts table reads as an outcome.
_KINDS = {
    "success": OutcomeKind.SUCCESS,
    "transient": OutcomeKind.TRANSIENT,
    "invalid_grant": OutcomeKind.INVALID_GRANT,
    "invalid_client": OutcomeKind.INVALID_CLIENT,
    "expired": OutcomeKind.REFRESH_TOKEN_EXPIRED,
}


async def refresh_once(
    scheduler: Scheduler,
    storage: AccountStore,
    account_id: str,
    *,
    since: datetime,
    trigger: Trigger,
) -> Outcome:
    """The outcome of the first refresh of ``account_id`` that started at or after ``since``.

    Raises :class:`~qbo_daemon.core.errors.AccountNotFoundError` for an unknown account.
    """
    # The version is read before the attempts: an attempt that commits while they are
    # read moves it on, and the attempts are read again.
    account = await storage.load(account_id)
    for _ in range(2):
        recent = await storage.attempts(account_id, limit=_RECENT_ATTEMPTS)  # newest first
        since_then = [a for a in recent if a.started_at >= since and a.outcome in _KINDS]
        if since_then:
            return await _recorded(storage, since_then[-1])
        current = await storage.load(account_id)
        if current.version == account.version:
            break
        account = current
    # An attempt in flight is joined; one that committed since the row was read
    # and left it fresh answers without a call (seen_version).
    return await scheduler.refresh_now(account_id, trigger=trigger, seen_version=account.version)


async def _recorded(storage: AccountStore, attempt: Attempt) -> Outcome:
    kind = _KINDS[attempt.outcome]
    try:
        account = await storage.load(attempt.account_id)
    except AccountNotFoundError:
        return Outcome(OutcomeKind.SKIPPED, None, message="no such account")
    if kind is OutcomeKind.SUCCESS and not account.status.scheduled:
        # Refreshed, then disconnected or refused since: the row's state is the answer.
        return Outcome(OutcomeKind.SKIPPED, account, message=f"account is {account.status}")
    return Outcome(kind, account, message=attempt.error, intuit_tid=attempt.intuit_tid)
