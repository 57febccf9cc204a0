"""The status page's reads on PostgreSQL: the same questions and values as on SQLite.

:class:`PgStatusQueries` answers what ``store/status_queries.py``'s
``StatusQueries`` answers, with the values and rules of
:mod:`qbo_daemon.store.status_values`, over the indexes of migration 3
(``store/postgres/schema.py``). No token column is ever selected, and no realm
id is decrypted to search: a realm is found by its keyed digest.

Times are ``timestamptz``. A row's sort key, the key a :class:`Cursor` carries,
is given as SQLite gives it, so a page link reads the same on either backend:
ISO text (``"~"`` for an account the scheduler does not time, ``""`` for one
that never failed), or the failure count.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from qbo_daemon.core.errors import AccountNotFoundError
from qbo_daemon.core.models import AccountStatus, iso, parse_iso, utc
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.postgres.database import PgDatabase
from qbo_daemon.store.postgres.schema import LAST_FAILURE_KEY, NEXT_REFRESH_KEY
from qbo_daemon.store.status_values import (
    COLUMNS,
    AccountRow,
    Dialect,
    MinuteCount,
    MinuteOutcomes,
    Page,
    PageRequest,
    Params,
    Sort,
    account_row,
    minute_of,
    read_page,
)

SORT_KEYS = {
    Sort.NEXT_REFRESH: NEXT_REFRESH_KEY,
    Sort.LAST_FAILURE: LAST_FAILURE_KEY,
    Sort.FAILURES: "failure_count",
}
# asyncpg reads 'infinity' and '-infinity' as these (naive) and writes them back from these.
_INFINITY = datetime.max.replace(tzinfo=UTC)
_NEVER = datetime.min.replace(tzinfo=UTC)
# The keys SQLite gives the same two ends: unscheduled (after every time), never failed.
_UNSCHEDULED_TEXT = "~"
_NEVER_TEXT = ""
# The accounts the scheduler times, as the partial index accounts_due has them.
_SCHEDULED = "status IN ('active', 'expired')"
# Each minute of a window as rows (lo, hi), from two arrays of bounds (see _minutes).
_MINUTES = "unnest($1::timestamptz[], $2::timestamptz[]) AS m(lo, hi)"


class PgStatusQueries:
    """The status page's queries (:class:`~qbo_daemon.store.status_values.StatusReads`)
    over PostgreSQL's accounts and attempts tables."""

    def __init__(self, database: PgDatabase, cipher: Callable[[], Cipher]) -> None:
        self._db = database
        self._cipher = cipher  # read at each use: a reload may swap the storage's keys

    async def status_counts(self, now: datetime) -> dict[AccountStatus, int]:
        """One pass over the (status, token_expires_at) index."""
        rows = await self._db.fetch(
            "SELECT status, count(*) AS n, "
            "count(*) FILTER (WHERE status = 'active' AND token_expires_at <= $1) AS dead "
            "FROM accounts GROUP BY status",
            now,
        )
        counts = dict.fromkeys(AccountStatus, 0)
        for row in rows:
            counts[AccountStatus(row["status"])] += row["n"] - row["dead"]
            counts[AccountStatus.EXPIRED] += row["dead"]
        return counts

    async def due_per_minute(self, now: datetime, within: timedelta) -> list[MinuteCount]:
        """Each minute counted from the scheduler's partial index alone (accounts_due)."""
        rows = await self._db.fetch(
            f"SELECT m.lo AS minute, (SELECT count(*) FROM accounts WHERE {_SCHEDULED} "
            f"AND reconnect_token_at >= m.lo AND reconnect_token_at < m.hi) AS n FROM {_MINUTES}",
            *_minutes(now, now + within),
        )
        return [MinuteCount(minute_of(utc(row["minute"])), row["n"]) for row in rows if row["n"]]

    async def overdue(self, now: datetime) -> int:
        row = await self._db.fetchrow(
            f"SELECT count(*) AS n FROM accounts WHERE {_SCHEDULED} AND reconnect_token_at < $1",
            now,
        )
        return int(row["n"]) if row else 0

    async def next_due(self, now: datetime, limit: int) -> list[AccountRow]:
        rows = await self._db.fetch(
            f"SELECT {COLUMNS}, {NEXT_REFRESH_KEY} AS sort_key FROM accounts "
            f"WHERE {NEXT_REFRESH_KEY} >= $1 AND {NEXT_REFRESH_KEY} < 'infinity' "
            f"ORDER BY {NEXT_REFRESH_KEY}, id LIMIT $2",
            now,
            limit,
        )
        return [self._row(row, now) for row in rows]

    async def attempts_per_minute(self, since: datetime, until: datetime) -> list[MinuteOutcomes]:
        """Each minute counted from the (started_at, outcome) index alone."""
        rows = await self._db.fetch(
            f"SELECT m.lo AS minute, c.ok, c.total FROM {_MINUTES} CROSS JOIN LATERAL ("
            "SELECT count(*) FILTER (WHERE outcome = 'success') AS ok, count(*) AS total "
            "FROM refresh_attempts WHERE started_at >= m.lo AND started_at < m.hi) AS c",
            *_minutes(since, until),
        )
        return [
            MinuteOutcomes(minute_of(utc(row["minute"])), row["ok"], row["total"] - row["ok"])
            for row in rows
            if row["total"]
        ]

    async def near_hard_expiry(
        self, now: datetime, within: timedelta, limit: int
    ) -> tuple[int, list[AccountRow]]:
        where = "WHERE refresh_token_hard_expires_at <= $1 AND status <> 'disconnected'"
        count = await self._db.fetchrow(f"SELECT count(*) AS n FROM accounts {where}", now + within)
        rows = await self._db.fetch(
            f"SELECT {COLUMNS}, 0 AS sort_key FROM accounts {where} "
            "ORDER BY refresh_token_hard_expires_at, id LIMIT $2",
            now + within,
            limit,
        )
        return (int(count["n"]) if count else 0), [self._row(row, now) for row in rows]

    async def account(self, account_id: str, now: datetime) -> AccountRow:
        row = await self._db.fetchrow(
            f"SELECT {COLUMNS}, 0 AS sort_key FROM accounts WHERE account_id = $1", account_id
        )
        if row is None:
            raise AccountNotFoundError(account_id)
        return self._row(row, now)

    async def page(self, request: PageRequest, now: datetime) -> Page:
        return await read_page(request, now, self._cipher(), DIALECT, self._fetch, self._row)

    async def _fetch(self, sql: str, values: list[Any]) -> list[asyncpg.Record]:
        return await self._db.fetch(sql, *values)

    def _row(self, row: asyncpg.Record, now: datetime) -> AccountRow:
        return account_row(row, now, self._cipher(), _time, _key_text(row["sort_key"]))


def _time(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def _key_text(value: datetime | int) -> str | int:
    """A row's sort key as SQLite has it (see the module docstring)."""
    if not isinstance(value, datetime):
        return value
    if value.replace(tzinfo=None) == datetime.max:
        return _UNSCHEDULED_TEXT
    if value.replace(tzinfo=None) == datetime.min:
        return _NEVER_TEXT
    return iso(value) or _NEVER_TEXT


def _key_value(sort: Sort, key: str | int) -> datetime | int:
    """A cursor's key as the sort's column holds it (read_page checked that it fits)."""
    if isinstance(key, int):
        return key
    if key == _UNSCHEDULED_TEXT:
        return _INFINITY
    if key == _NEVER_TEXT:
        return _NEVER
    return parse_iso(key) or _NEVER


def _minutes(start: datetime, end: datetime) -> tuple[list[datetime], list[datetime]]:
    """The bounds of each minute from ``start`` to ``end``: the first minute starts at
    ``start``, the others on the minute, and the last ends at ``end``."""
    starts, ends = [], []
    lo = start
    while lo < end:
        hi = min(minute_of(lo) + timedelta(minutes=1), end)
        starts.append(lo)
        ends.append(hi)
        lo = hi
    return starts, ends


DIALECT = Dialect(
    params=lambda: Params(numbered=True),
    keys=SORT_KEYS,
    unscheduled="'infinity'::timestamptz",
    page_status="status",
    # Byte by byte, as SQLite compares, whatever the database's collation (indexed).
    account_id='account_id COLLATE "C"',
    cursor_key=_key_value,
)
