"""The status page's reads, as an engine service: the HTTP handlers never reach the store.

The queries themselves are the store's (:mod:`qbo_daemon.store.status_queries` on SQLite,
:mod:`qbo_daemon.store.postgres.status_queries` on PostgreSQL:
indexed counts and pages that never select a token column, statuses shown by
:func:`~qbo_daemon.core.models.shown_status`). This service hands them to
``qbo_daemon.http.ui`` with the refresh history of an account, and names the
value types the pages build and read, and the scheduler's live timers, so
the status page keeps to the rule that HTTP handlers call engine services only.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

from qbo_daemon.core.models import AccountStatus
from qbo_daemon.engine.scheduler import Scheduler
from qbo_daemon.store.port import Attempt
from qbo_daemon.store.status_values import (
    AccountRow,
    Cursor,
    MinuteCount,
    MinuteOutcomes,
    Page,
    PageRequest,
    Sort,
    StatusReads,
)

__all__ = [
    "AccountRow",
    "Attempt",
    "Cursor",
    "MinuteCount",
    "MinuteOutcomes",
    "Page",
    "PageRequest",
    "Sort",
    "StatusPage",
    "StatusSource",
]


class StatusSource(Protocol):
    """What the status page reads from: either store's queries and attempts."""

    @property
    def status_page(self) -> StatusReads: ...

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]: ...


class StatusPage:
    """The status page's reads; every one of them is the store's, none writes."""

    def __init__(self, source: StatusSource, scheduler: Scheduler) -> None:
        self._source = source
        self._scheduler = scheduler

    # -- the running scheduler -------------------------------------------------------

    def due_at(self, account_id: str) -> datetime | None:
        """When the account's timer fires (None when it has none)."""
        return self._scheduler.due_at(account_id)

    @property
    def scheduled(self) -> int:
        """Accounts with a timer."""
        return self._scheduler.scheduled

    @property
    def in_flight(self) -> int:
        """Refresh attempts in flight."""
        return self._scheduler.in_flight

    # -- the store's reads -----------------------------------------------------------

    @property
    def _queries(self) -> StatusReads:
        return self._source.status_page

    async def status_counts(self, now: datetime) -> dict[AccountStatus, int]:
        return await self._queries.status_counts(now)

    async def due_per_minute(self, now: datetime, within: timedelta) -> list[MinuteCount]:
        return await self._queries.due_per_minute(now, within)

    async def overdue(self, now: datetime) -> int:
        return await self._queries.overdue(now)

    async def next_due(self, now: datetime, limit: int) -> list[AccountRow]:
        return await self._queries.next_due(now, limit)

    async def attempts_per_minute(self, since: datetime, until: datetime) -> list[MinuteOutcomes]:
        return await self._queries.attempts_per_minute(since, until)

    async def near_hard_expiry(
        self, now: datetime, within: timedelta, limit: int
    ) -> tuple[int, list[AccountRow]]:
        return await self._queries.near_hard_expiry(now, within, limit)

    async def account(self, account_id: str, now: datetime) -> AccountRow:
        """One account's row; :class:`AccountNotFoundError` if unknown."""
        return await self._queries.account(account_id, now)

    async def page(self, request: PageRequest, now: datetime) -> Page:
        return await self._queries.page(request, now)

    async def attempts(self, account_id: str, limit: int = 100) -> list[Attempt]:
        """The account's newest refresh attempts first."""
        return await self._source.attempts(account_id, limit=limit)
