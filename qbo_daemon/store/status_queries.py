"""The status page's reads: counts, time windows and a paginated account listing.

No token column is ever selected here: what these queries return may be shown
on a page. The listing pages by keyset (the last row's sort key and id), over
the indexes of migration 3, so the first page costs the same at 100,000
accounts as at ten, and so does the thousandth.

An active account whose access token has died reads ``expired`` here, as in the
API (:func:`qbo_daemon.core.models.shown_status`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from qbo_daemon.core.errors import AccountNotFoundError, CryptoError
from qbo_daemon.core.models import AccountStatus, iso, parse_iso, shown_status
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.rows import REALM_DIGEST_PURPOSE
from qbo_daemon.store.schema import LAST_FAILURE_KEY, NEXT_REFRESH_KEY
from qbo_daemon.store.sqlite import Database

# The columns a page may show: no token, and the realm id decrypted one row at a time.
_COLUMNS = (
    "id, account_id, status, realm_id, token_expires_at, reconnect_token_at, "
    "refresh_token_expires_at, refresh_token_hard_expires_at, failure_count, last_error, "
    "last_refreshed_at, last_failure_at, created_at, updated_at"
)
# The minutes of a window as rows (lo, hi): the first starts at the window's start, the
# others on the minute; the last ends at the window's end. Times in the stored ISO form.
_MINUTES = (
    "WITH RECURSIVE minutes(lo, hi) AS ("
    "SELECT ?1, min(strftime('%Y-%m-%dT%H:%M:00.000000Z', ?1, '+1 minutes'), ?2) "
    "UNION ALL SELECT hi, min(strftime('%Y-%m-%dT%H:%M:00.000000Z', hi, '+1 minutes'), ?2) "
    "FROM minutes WHERE hi < ?2)"
)


class Sort(StrEnum):
    """The listing's orders: each is (key expression, descending)."""

    NEXT_REFRESH = "next_refresh"
    LAST_FAILURE = "last_failure"
    FAILURES = "failures"

    @property
    def key(self) -> str:
        return {
            Sort.NEXT_REFRESH: NEXT_REFRESH_KEY,
            Sort.LAST_FAILURE: LAST_FAILURE_KEY,
            Sort.FAILURES: "failure_count",
        }[self]

    @property
    def descending(self) -> bool:
        return self is not Sort.NEXT_REFRESH


@dataclass(frozen=True, slots=True)
class AccountRow:
    """An account as the status page shows it: times and bookkeeping, never a token."""

    id: int
    account_id: str
    status: AccountStatus  # as reported (see shown_status)
    realm_id: str | None
    token_expires_at: datetime | None
    reconnect_token_at: datetime | None
    refresh_token_expires_at: datetime | None
    refresh_token_hard_expires_at: datetime | None
    failure_count: int
    last_error: str | None
    last_refreshed_at: datetime | None
    last_failure_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    sort_key: str | int  # this row's value of the listing's sort key, for the cursor


@dataclass(frozen=True, slots=True)
class Cursor:
    """A place in a listing: the sort key and id of the row a page starts after."""

    key: str | int
    id: int


@dataclass(frozen=True, slots=True)
class PageRequest:
    status: AccountStatus | None = None
    search: str = ""
    sort: Sort = Sort.NEXT_REFRESH
    after: Cursor | None = None  # the page after this row...
    before: Cursor | None = None  # ...or the page before this one
    limit: int = 50


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[AccountRow]
    total: int  # accounts matching the filter and search, on every page
    next: Cursor | None
    previous: Cursor | None


@dataclass(frozen=True, slots=True)
class MinuteCount:
    minute: datetime  # the start of the minute, UTC
    count: int


@dataclass(frozen=True, slots=True)
class MinuteOutcomes:
    minute: datetime
    succeeded: int
    failed: int


class StatusQueries:
    """Read-only queries over the accounts and attempts tables, for the status page."""

    def __init__(self, database: Database, cipher: Callable[[], Cipher]) -> None:
        self._db = database
        # The cipher is read at each use: a reload may swap the storage's keys.
        self._cipher = cipher

    async def status_counts(self, now: datetime) -> dict[AccountStatus, int]:
        """Accounts per status as reported; every status is present."""
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
        """Scheduled refreshes in each minute from ``now`` to ``now + within`` (every minute).

        One count per minute over the index, rather than one GROUP BY over the rows:
        at 100,000 accounts due within the hour that is 10 ms against 300.
        """
        rows = await self._db.fetchall(
            f"{_MINUTES} SELECT lo AS minute, (SELECT COUNT(*) FROM accounts "
            f"WHERE {NEXT_REFRESH_KEY} >= lo AND {NEXT_REFRESH_KEY} < hi) AS n FROM minutes",
            _minutes_params(now, now + within),
        )
        return [MinuteCount(_minute(row["minute"]), row["n"]) for row in rows if row["n"]]

    async def overdue(self, now: datetime) -> int:
        """Scheduled accounts whose refresh time has passed: retrying, or being caught up."""
        row = await self._db.fetchone(
            f"SELECT COUNT(*) AS n FROM accounts WHERE {NEXT_REFRESH_KEY} < ?", (iso(now),)
        )
        return int(row["n"]) if row else 0

    async def next_due(self, now: datetime, limit: int) -> list[AccountRow]:
        """The next ``limit`` accounts to refresh from ``now`` on, soonest first."""
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS}, {NEXT_REFRESH_KEY} AS sort_key FROM accounts "
            f"WHERE {NEXT_REFRESH_KEY} >= ? AND {NEXT_REFRESH_KEY} < '~' "
            f"ORDER BY {NEXT_REFRESH_KEY}, id LIMIT ?",
            (iso(now), limit),
        )
        return [self._row(row, now) for row in rows]

    async def attempts_per_minute(self, since: datetime, until: datetime) -> list[MinuteOutcomes]:
        """Refresh attempts in each minute from ``since`` to ``until``: succeeded and failed
        (minutes with any), counted over the (started_at, outcome) index."""
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
        """Connected accounts whose refresh token meets Intuit's 5-year limit within ``within``:
        how many, and the first ``limit`` of them, soonest first."""
        where = (
            "WHERE refresh_token_hard_expires_at <= ? "
            "AND refresh_token_hard_expires_at IS NOT NULL AND status != 'disconnected'"
        )
        params = (iso(now + within),)
        count = await self._db.fetchone(f"SELECT COUNT(*) AS n FROM accounts {where}", params)
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS}, 0 AS sort_key FROM accounts {where} "
            "ORDER BY refresh_token_hard_expires_at, id LIMIT ?",
            (*params, limit),
        )
        return (int(count["n"]) if count else 0), [self._row(row, now) for row in rows]

    async def account(self, account_id: str, now: datetime) -> AccountRow:
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS}, 0 AS sort_key FROM accounts WHERE account_id = ?", (account_id,)
        )
        if row is None:
            raise AccountNotFoundError(account_id)
        return self._row(row, now)

    async def page(self, request: PageRequest, now: datetime) -> Page:
        """One page of the listing, filtered, searched and sorted."""
        where, params = status_filter(request.status, now)
        page_where, page_params = status_filter(request.status, now, for_page=True)
        if request.search:
            search_sql, search_params = await self._search(request.search)
            where, params = [*where, search_sql], [*params, *search_params]
            page_where, page_params = [*page_where, search_sql], [*page_params, *search_params]
        sql, page_params = page_query(request, page_where, page_params)
        rows = await self._db.fetchall(sql, page_params)
        more = len(rows) > request.limit
        found = [self._row(row, now) for row in rows[: request.limit]]
        backward = request.before is not None
        if backward:
            found.reverse()
        counted = await self._db.fetchone(
            f"SELECT COUNT(*) AS n FROM accounts {_where(where)}", params
        )
        first, last = (_cursor(found[0]), _cursor(found[-1])) if found else (None, None)
        if backward:
            previous, following = (first if more else None), last
        else:
            came_from = request.after is not None
            previous, following = (first if came_from else None), (last if more else None)
        return Page(
            rows=found,
            total=int(counted["n"]) if counted else 0,
            next=following,
            previous=previous,
        )

    # -- helpers ---------------------------------------------------------------

    async def _search(self, text: str) -> tuple[str, list[Any]]:
        """Accounts whose id starts with ``text``, or whose realm id is ``text`` (digits).

        Realm ids are encrypted with a fresh nonce each; a realm is found through
        its keyed digest (``realm_digest``, indexed), under every configured key.
        Intuit's realm ids are digits; other text is looked up as an account id only.
        """
        prefix = "account_id >= ? AND account_id < ?"
        params: list[Any] = [text, text + "\U0010ffff"]
        if not text.isdigit():
            return f"({prefix})", params
        digests = self._cipher().digests(text, purpose=REALM_DIGEST_PURPOSE)
        realm = f"realm_digest IN ({', '.join('?' * len(digests))})"
        return f"({prefix} OR {realm})", [*params, *digests]

    def _row(self, row: sqlite3.Row, now: datetime) -> AccountRow:
        token_expires_at = parse_iso(row["token_expires_at"])
        return AccountRow(
            id=row["id"],
            account_id=row["account_id"],
            status=shown_status(AccountStatus(row["status"]), token_expires_at, now),
            realm_id=_realm(self._cipher(), row),
            token_expires_at=token_expires_at,
            reconnect_token_at=parse_iso(row["reconnect_token_at"]),
            refresh_token_expires_at=parse_iso(row["refresh_token_expires_at"]),
            refresh_token_hard_expires_at=parse_iso(row["refresh_token_hard_expires_at"]),
            failure_count=row["failure_count"],
            last_error=row["last_error"],
            last_refreshed_at=parse_iso(row["last_refreshed_at"]),
            last_failure_at=parse_iso(row["last_failure_at"]),
            created_at=parse_iso(row["created_at"]),
            updated_at=parse_iso(row["updated_at"]),
            sort_key=row["sort_key"],
        )


def _realm(cipher: Cipher, row: sqlite3.Row) -> str | None:
    value = row["realm_id"]
    if value is None:
        return None
    try:
        return cipher.decrypt(value, table="accounts", column="realm_id", row_key=row["account_id"])
    except CryptoError:
        # One unreadable row must not take the page down; start-up already checked the keys.
        return None


def status_filter(
    status: AccountStatus | None, now: datetime, *, for_page: bool = False
) -> tuple[list[str], list[Any]]:
    """The conditions selecting accounts shown with ``status`` (any status for None).

    ``for_page``: the conditions of a page, which must walk its sort's index in order
    rather than collect the status's rows through the status index and sort them
    (``+status`` keeps SQLite from choosing that index). A count wants the status index.
    """
    column = "+status" if for_page else "status"
    if status is AccountStatus.ACTIVE:
        return [f"{column} = 'active' AND (token_expires_at IS NULL OR token_expires_at > ?)"], [
            iso(now)
        ]
    if status is AccountStatus.EXPIRED:
        return [f"({column} = 'expired' OR ({column} = 'active' AND token_expires_at <= ?))"], [
            iso(now)
        ]
    if status is not None:
        return [f"{column} = ?"], [status.value]
    return [], []


def page_query(request: PageRequest, where: list[str], params: list[Any]) -> tuple[str, list[Any]]:
    """The SQL of one page: the conditions, then a keyset step in the sort's index order.

    One row more than the page is asked for, to know whether another page follows.
    """
    sort = request.sort
    backward = request.before is not None
    cursor = request.before if backward else request.after
    # Walking backward is walking the reversed order forward, then turning the page.
    descending = sort.descending != backward
    conditions, values = list(where), list(params)
    if sort is Sort.NEXT_REFRESH and request.status is not None and not request.status.scheduled:
        # Unscheduled accounts all sort last: seek there rather than walk past every other
        # (">=" rather than "=": with "=" SQLite sorts the matches instead of walking in order).
        conditions.append(f"{NEXT_REFRESH_KEY} >= '~'")
    if cursor is not None:
        # The bound on the key alone lets SQLite seek to the cursor in an expression index;
        # the row value alone would walk the index from its start.
        side = "<" if descending else ">"
        conditions.append(f"{sort.key} {side}= ? AND ({sort.key}, id) {side} (?, ?)")
        values.extend((cursor.key, cursor.key, cursor.id))
    order = "DESC" if descending else "ASC"
    sql = (
        f"SELECT {_COLUMNS}, {sort.key} AS sort_key FROM accounts {_where(conditions)} "
        f"ORDER BY {sort.key} {order}, id {order} LIMIT ?"
    )
    return sql, [*values, request.limit + 1]


def _where(conditions: list[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def _cursor(row: AccountRow) -> Cursor:
    return Cursor(row.sort_key, row.id)


def _minutes_params(start: datetime, end: datetime) -> tuple[str | None, str | None]:
    return iso(start), iso(end)


def _minute(text: str) -> datetime:
    """The minute a time falls in."""
    parsed = parse_iso(text)
    assert parsed is not None
    return parsed.replace(second=0, microsecond=0)
