"""The status page's values, and the rules its queries follow on either backend.

``store/status_queries.py`` (SQLite) and ``store/postgres/status_queries.py``
answer the same questions with the same values; what they share is here: the
values (:class:`AccountRow`, :class:`Page`, :class:`Cursor`, …), which rows a
shown status selects, how a search matches, how a keyset page is asked for and
turned, and how a row becomes an :class:`AccountRow`. Each backend gives its
SQL spelling as a :class:`Dialect`.

No token column is ever selected: what these queries return may be shown on a
page. A realm id is decrypted one row at a time, never searched in clear.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from qbo_daemon.core.errors import CryptoError
from qbo_daemon.core.models import AccountStatus, parse_iso, shown_status
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.rows import REALM_DIGEST_PURPOSE

# The columns a page may show: no token, and the realm id decrypted one row at a time.
COLUMNS = (
    "id, account_id, status, realm_id, token_expires_at, reconnect_token_at, "
    "refresh_token_expires_at, refresh_token_hard_expires_at, failure_count, last_error, "
    "last_refreshed_at, last_failure_at, created_at, updated_at"
)
# Above every character an account id may hold: text + this bounds the ids starting with text.
_LAST_CHARACTER = "\U0010ffff"


class Sort(StrEnum):
    """The listing's orders (each backend names the key of each, see :class:`Dialect`)."""

    NEXT_REFRESH = "next_refresh"
    LAST_FAILURE = "last_failure"
    FAILURES = "failures"

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


class StatusReads(Protocol):
    """The status page's queries, as either backend answers them."""

    async def status_counts(self, now: datetime) -> dict[AccountStatus, int]:
        """Accounts per status as reported; every status is present."""

    async def due_per_minute(self, now: datetime, within: timedelta) -> list[MinuteCount]:
        """Scheduled refreshes in each minute from ``now`` to ``now + within`` (minutes
        with any)."""

    async def overdue(self, now: datetime) -> int:
        """Scheduled accounts whose refresh time has passed: retrying, or being caught up."""

    async def next_due(self, now: datetime, limit: int) -> list[AccountRow]:
        """The next ``limit`` accounts to refresh from ``now`` on, soonest first."""

    async def attempts_per_minute(self, since: datetime, until: datetime) -> list[MinuteOutcomes]:
        """Refresh attempts in each minute from ``since`` to ``until``: succeeded and failed
        (minutes with any)."""

    async def near_hard_expiry(
        self, now: datetime, within: timedelta, limit: int
    ) -> tuple[int, list[AccountRow]]:
        """Connected accounts whose refresh token meets Intuit's 5-year limit within ``within``:
        how many, and the first ``limit`` of them, soonest first."""

    async def account(self, account_id: str, now: datetime) -> AccountRow:
        """One account's row; :class:`AccountNotFoundError` if unknown."""

    async def page(self, request: PageRequest, now: datetime) -> Page:
        """One page of the listing, filtered, searched and sorted (:func:`read_page`)."""


@dataclass
class Params:
    """A statement's parameters, collected as its text is written: ``params(value)`` keeps
    the value and returns its placeholder (``?`` for SQLite, ``$n`` for PostgreSQL)."""

    numbered: bool
    convert: Callable[[Any], Any] = lambda value: value
    values: list[Any] = field(default_factory=list)

    def __call__(self, value: Any) -> str:
        self.values.append(self.convert(value))
        return f"${len(self.values)}" if self.numbered else "?"


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one backend spells what the listing needs."""

    params: Callable[[], Params]  # an empty parameter list
    keys: Mapping[Sort, str]  # each sort's key, as its index has it
    unscheduled: str  # the NEXT_REFRESH key of an account the scheduler does not time
    page_status: str  # the status column in a page's conditions
    account_id: str  # the account id, compared character by character
    cursor_key: Callable[[Sort, str | int], Any]  # a cursor's key as a parameter


def status_conditions(
    status: AccountStatus | None, now: datetime, params: Params, *, column: str = "status"
) -> list[str]:
    """The conditions selecting accounts shown with ``status`` (any status for None):
    an active row whose access token has died is shown expired."""
    if status is AccountStatus.ACTIVE:
        alive = f"token_expires_at IS NULL OR token_expires_at > {params(now)}"
        return [f"{column} = 'active' AND ({alive})"]
    if status is AccountStatus.EXPIRED:
        return [
            f"({column} = 'expired' OR ({column} = 'active' AND token_expires_at <= {params(now)}))"
        ]
    if status is not None:
        return [f"{column} = {params(status.value)}"]
    return []


def search_condition(text: str, cipher: Cipher, params: Params, *, account_id: str) -> str:
    """Accounts whose id starts with ``text``, or whose realm id is ``text`` (digits).

    Realm ids are encrypted with a fresh nonce each; a realm is found through
    its keyed digest (``realm_digest``, indexed), under every configured key.
    Intuit's realm ids are digits; other text is looked up as an account id only.
    """
    prefix = f"{account_id} >= {params(text)} AND {account_id} < {params(text + _LAST_CHARACTER)}"
    if not text.isdigit():
        return f"({prefix})"
    digests = cipher.digests(text, purpose=REALM_DIGEST_PURPOSE)
    return f"({prefix} OR realm_digest IN ({', '.join(params(d) for d in digests)}))"


def page_statement(request: PageRequest, where: list[str], params: Params, dialect: Dialect) -> str:
    """The SQL of one page: the conditions, then a keyset step in the sort's index order.

    One row more than the page is asked for, to know whether another page follows.
    """
    sort = request.sort
    key = dialect.keys[sort]
    backward = request.before is not None
    cursor = request.before if backward else request.after
    # Walking backward is walking the reversed order forward, then turning the page.
    descending = sort.descending != backward
    conditions = list(where)
    if sort is Sort.NEXT_REFRESH and request.status is not None and not request.status.scheduled:
        # Unscheduled accounts all sort last: seek there rather than walk past every other
        # (">=" rather than "=": with "=" SQLite sorts the matches instead of walking in order).
        conditions.append(f"{key} >= {dialect.unscheduled}")
    if cursor is not None:
        # The bound on the key alone lets SQLite seek to the cursor in an expression index;
        # the row value alone would walk the index from its start.
        side = "<" if descending else ">"
        value = dialect.cursor_key(sort, cursor.key)
        conditions.append(
            f"{key} {side}= {params(value)} AND ({key}, id) {side} ({params(value)}, "
            f"{params(cursor.id)})"
        )
    order = "DESC" if descending else "ASC"
    return (
        f"SELECT {COLUMNS}, {key} AS sort_key FROM accounts {where_clause(conditions)} "
        f"ORDER BY {key} {order}, id {order} LIMIT {params(request.limit + 1)}"
    )


async def read_page(
    request: PageRequest,
    now: datetime,
    cipher: Cipher,
    dialect: Dialect,
    fetch: Callable[[str, list[Any]], Awaitable[list[Any]]],
    row: Callable[[Any, datetime], AccountRow],
) -> Page:
    """One page of the listing, filtered, searched and sorted, and how many match:
    ``fetch`` runs a statement, ``row`` shows one of its rows at ``now``.

    A cursor whose key no row of the sort could have (a link edited by hand) is
    dropped: the listing starts from its first page.
    """
    if not all(c is None or fits(request.sort, c.key) for c in (request.after, request.before)):
        request = replace(request, after=None, before=None)
    counted, paged = dialect.params(), dialect.params()
    where = status_conditions(request.status, now, counted)
    page_where = status_conditions(request.status, now, paged, column=dialect.page_status)
    if request.search:
        for conditions, params in ((where, counted), (page_where, paged)):
            conditions.append(
                search_condition(request.search, cipher, params, account_id=dialect.account_id)
            )
    sql = page_statement(request, page_where, paged, dialect)
    rows = [row(found, now) for found in await fetch(sql, paged.values)]
    (total,) = await fetch(
        f"SELECT COUNT(*) AS n FROM accounts {where_clause(where)}", counted.values
    )
    return turn_page(request, rows, int(total["n"]))


def fits(sort: Sort, key: str | int) -> bool:
    """Whether a row of ``sort`` could have ``key`` as its sort key: the failure count,
    or ISO text (also "~" for an account the scheduler does not time, "" for one
    that never failed)."""
    if sort is Sort.FAILURES:
        return isinstance(key, int) and not isinstance(key, bool)
    if not isinstance(key, str):
        return False
    if key == ("~" if sort is Sort.NEXT_REFRESH else ""):
        return True
    try:
        return parse_iso(key) is not None
    except ValueError:
        return False


def turn_page(request: PageRequest, rows: list[AccountRow], total: int) -> Page:
    """The page of ``rows`` (up to one more than the limit, in the order walked)."""
    more = len(rows) > request.limit
    found = rows[: request.limit]
    backward = request.before is not None
    if backward:
        found.reverse()
    first, last = (_cursor(found[0]), _cursor(found[-1])) if found else (None, None)
    if backward:
        previous, following = (first if more else None), last
    else:
        came_from = request.after is not None
        previous, following = (first if came_from else None), (last if more else None)
    return Page(rows=found, total=total, next=following, previous=previous)


def account_row(
    row: Any,
    now: datetime,
    cipher: Cipher,
    time: Callable[[Any], datetime | None],
    sort_key: str | int,
) -> AccountRow:
    """The :class:`AccountRow` of a row of :data:`COLUMNS`; ``time`` reads a stored time."""
    token_expires_at = time(row["token_expires_at"])
    return AccountRow(
        id=row["id"],
        account_id=row["account_id"],
        status=shown_status(AccountStatus(row["status"]), token_expires_at, now),
        realm_id=_realm(cipher, row),
        token_expires_at=token_expires_at,
        reconnect_token_at=time(row["reconnect_token_at"]),
        refresh_token_expires_at=time(row["refresh_token_expires_at"]),
        refresh_token_hard_expires_at=time(row["refresh_token_hard_expires_at"]),
        failure_count=row["failure_count"],
        last_error=row["last_error"],
        last_refreshed_at=time(row["last_refreshed_at"]),
        last_failure_at=time(row["last_failure_at"]),
        created_at=time(row["created_at"]),
        updated_at=time(row["updated_at"]),
        sort_key=sort_key,
    )


def minute_of(value: datetime) -> datetime:
    """The minute a time falls in."""
    return value.replace(second=0, microsecond=0)


def where_clause(conditions: list[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def _realm(cipher: Cipher, row: Any) -> str | None:
    value = row["realm_id"]
    if value is None:
        return None
    try:
        return cipher.decrypt(value, table="accounts", column="realm_id", row_key=row["account_id"])
    except CryptoError:
        # One unreadable row must not take the page down; start-up already checked the keys.
        return None


def _cursor(row: AccountRow) -> Cursor:
    return Cursor(row.sort_key, row.id)
