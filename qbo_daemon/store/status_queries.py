"""The status page's reads on SQLite: counts, time windows and a paginated account listing.

No token column is ever selected here: what these queries return may be shown
on a page. The listing pages by keyset (the last row's sort key and id), over
the indexes of migration 3, so the first page costs the same at 100,000
accounts as at ten, and so does the thousandth. The values and the rules both
backends share are :mod:`qbo_daemon.store.status_values`'s.

An active account whose access token has died reads ``expired`` here, as in the
API (:func:`qbo_daemon.core.models.shown_status`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from qbo_daemon.core.errors import AccountNotFoundError
from qbo_daemon.core.models import AccountStatus, iso, parse_iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.schema import LAST_FAILURE_KEY, NEXT_REFRESH_KEY
from qbo_daemon.store.sqlite import Database
from qbo_daemon.store.status_values import (
    COLUMNS,
    AccountRow,
    Cursor,
    Dialect,
    MinuteCount,
    MinuteOutcomes,
    Page,
    PageRequest,
    Params,
    Sort,
    account_row,
    minute_of,
    page_statement,
    read_page,
    status_conditions,
)

__all__ = [
    "AccountRow",
    "Cursor",
    "MinuteCount",
    "MinuteOutcomes",
    "Page",
    "PageRequest",
    "Sort",
    "StatusQueries",
    "page_query",
    "status_filter",
]

# The sort keys as migration 3 indexes them.
SORT_KEYS = {
    Sort.NEXT_REFRESH: NEXT_REFRESH_KEY,
    Sort.LAST_FAILURE: LAST_FAILURE_KEY,
    Sort.FAILURES: "failure_count",
}
# The minutes of a window as rows (lo, hi): the first starts at the window's start, the
# others on the minute; the last ends at the window's end. Times in the stored ISO form.
_MINUTES = (
    "WITH RECURSIVE minutes(lo, hi) AS ("
    "SELECT ?1, min(strftime('%Y-%m-%dT%H:%M:00.000000Z', ?1, '+1 minutes'), ?2) "
    "UNION ALL SELECT hi, min(strftime('%Y-%m-%dT%H:%M:00.000000Z', hi, '+1 minutes'), ?2) "
    "FROM minutes WHERE hi < ?2)"
)


class StatusQueries:
    """The status page's queries (:class:`~qbo_daemon.store.status_values.StatusReads`)
    over SQLite's accounts and attempts tables."""

    def __init__(self, database: Database, cipher: Callable[[], Cipher]) -> None:
        self._db = database
        # The cipher is read at each use: a reload may swap the storage's keys.
        self._cipher = cipher

    async def status_counts(self, now: datetime) -> dict[AccountStatus, int]:
        rows = await self._db.fetchall(
            "SELECT status, COUNT(*) AS n FROM accounts GROUP BY status", ()
        )
        dead = await self._db.fetchone(
            "SELECT COUNT(*) AS n FROM accounts WHERE status = 'active' AND token_expires_at <= ?",
            (iso(now),),
        )
        counts = dict.fromkeys(AccountStatus, 0)
        for row in rows:
            counts[AccountStatus(row["status"])] += row["n"]
        moved = int(dead["n"]) if dead else 0
        counts[AccountStatus.ACTIVE] -= moved
        counts[AccountStatus.EXPIRED] += moved
        return counts

    async def due_per_minute(self, now: datetime, within: timedelta) -> list[MinuteCount]:
        """One count per minute over the index, rather than one GROUP BY over the rows:
        at 100,000 accounts due within the hour that is 10 ms against 300."""
        rows = await self._db.fetchall(
            f"{_MINUTES} SELECT lo AS minute, (SELECT COUNT(*) FROM accounts "
            f"WHERE {NEXT_REFRESH_KEY} >= lo AND {NEXT_REFRESH_KEY} < hi) AS n FROM minutes",
            _minutes_params(now, now + within),
        )
        return [MinuteCount(_minute(row["minute"]), row["n"]) for row in rows if row["n"]]

    async def overdue(self, now: datetime) -> int:
        row = await self._db.fetchone(
            f"SELECT COUNT(*) AS n FROM accounts WHERE {NEXT_REFRESH_KEY} < ?", (iso(now),)
        )
        return int(row["n"]) if row else 0

    async def next_due(self, now: datetime, limit: int) -> list[AccountRow]:
        rows = await self._db.fetchall(
            f"SELECT {COLUMNS}, {NEXT_REFRESH_KEY} AS sort_key FROM accounts "
            f"WHERE {NEXT_REFRESH_KEY} >= ? AND {NEXT_REFRESH_KEY} < '~' "
            f"ORDER BY {NEXT_REFRESH_KEY}, id LIMIT ?",
            (iso(now), limit),
        )
        return [self._row(row, now) for row in rows]

    async def attempts_per_minute(self, since: datetime, until: datetime) -> list[MinuteOutcomes]:
        """Counted over the (started_at, outcome) index."""
        rows = await self._db.fetchall(
            f"{_MINUTES} SELECT lo AS minute, "
            "(SELECT COUNT(*) FROM refresh_attempts WHERE started_at >= lo AND started_at < hi "
            "AND outcome = 'success') AS ok, "
            "(SELECT COUNT(*) FROM refresh_attempts WHERE started_at >= lo AND started_at < hi) "
            "AS total FROM minutes",
            _minutes_params(since, until),
        )
        return [
            MinuteOutcomes(_minute(row["minute"]), row["ok"], row["total"] - row["ok"])
            for row in rows
            if row["total"]
        ]

    async def near_hard_expiry(
        self, now: datetime, within: timedelta, limit: int
    ) -> tuple[int, list[AccountRow]]:
        where = (
            "WHERE refresh_token_hard_expires_at <= ? "
            "AND refresh_token_hard_expires_at IS NOT NULL AND status != 'disconnected'"
        )
        params = (iso(now + within),)
        count = await self._db.fetchone(f"SELECT COUNT(*) AS n FROM accounts {where}", params)
        rows = await self._db.fetchall(
            f"SELECT {COLUMNS}, 0 AS sort_key FROM accounts {where} "
            "ORDER BY refresh_token_hard_expires_at, id LIMIT ?",
            (*params, limit),
        )
        return (int(count["n"]) if count else 0), [self._row(row, now) for row in rows]

    async def account(self, account_id: str, now: datetime) -> AccountRow:
        row = await self._db.fetchone(
            f"SELECT {COLUMNS}, 0 AS sort_key FROM accounts WHERE account_id = ?", (account_id,)
        )
        if row is None:
            raise AccountNotFoundError(account_id)
        return self._row(row, now)

    async def page(self, request: PageRequest, now: datetime) -> Page:
        return await read_page(request, now, self._cipher(), _DIALECT, self._db.fetchall, self._row)

    def _row(self, row: sqlite3.Row, now: datetime) -> AccountRow:
        return account_row(row, now, self._cipher(), parse_iso, row["sort_key"])


def status_filter(
    status: AccountStatus | None, now: datetime, *, for_page: bool = False
) -> tuple[list[str], list[Any]]:
    """The conditions selecting accounts shown with ``status`` (any status for None).

    ``for_page``: the conditions of a page, which must walk its sort's index in order
    rather than collect the status's rows through the status index and sort them
    (``+status`` keeps SQLite from choosing that index). A count wants the status index.
    """
    params = _params()
    column = "+status" if for_page else "status"
    return status_conditions(status, now, params, column=column), params.values


def page_query(request: PageRequest, where: list[str], params: list[Any]) -> tuple[str, list[Any]]:
    """The SQL of one page and its parameters (``where`` and ``params``'s, then its own)."""
    values = _params()
    values.values.extend(params)
    return page_statement(request, where, values, _DIALECT), values.values


def _params() -> Params:
    return Params(numbered=False, convert=_stored)


def _stored(value: Any) -> Any:
    """A parameter as SQLite stores it: times as ISO text."""
    return iso(value) if isinstance(value, datetime) else value


def _minutes_params(start: datetime, end: datetime) -> tuple[str | None, str | None]:
    return iso(start), iso(end)


def _minute(text: str) -> datetime:
    """The minute a time falls in."""
    parsed = parse_iso(text)
    assert parsed is not None
    return minute_of(parsed)


_DIALECT = Dialect(
    params=_params,
    keys=SORT_KEYS,
    unscheduled="'~'",
    # "+status" keeps SQLite from collecting a status's rows through the status index
    # and sorting them: a page walks its sort's index in order.
    page_status="+status",
    account_id="account_id",
    cursor_key=lambda _sort, key: key,
)
