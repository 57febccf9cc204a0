"""The status page's reads on both backends: counts, windows, the paginated listing.

Each test runs against a real SQLite file and a fresh PostgreSQL database (the
``backend`` and ``storage`` fixtures of ``conftest.py``); rows are changed around
the storage with the database's own client. The query plans are checked on each.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from qbo_daemon.core.errors import TransientIntuitError
from qbo_daemon.core.models import AccountStatus, ImportItem, TokenSet, iso
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.port import AccountWrite
from qbo_daemon.store.postgres.status_queries import DIALECT as PG_DIALECT
from qbo_daemon.store.postgres.storage import PostgresStorage
from qbo_daemon.store.repository import Attempt, Storage
from qbo_daemon.store.schema import MIGRATIONS, sha256_hex
from qbo_daemon.store.status_queries import (
    AccountRow,
    Cursor,
    PageRequest,
    Sort,
    page_query,
    status_filter,
)
from qbo_daemon.store.status_values import page_statement, status_conditions
from tests.pg import fresh_database
from tests.store.backends import AnyStorage, Backend
from tests.store.writes import (
    POLICY,
    import_accounts,
    record_failure,
    save_connection,
    save_refresh,
)

NOW = datetime(2026, 11, 29, 12, 0, 30, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "status.sqlite3"


def update(account_id: str, **columns: datetime | str | int | None) -> str:
    """An UPDATE of one account's columns that both backends read (times as ISO text)."""
    sets = ", ".join(f"{name} = {_literal(value)}" for name, value in columns.items())
    return f"UPDATE accounts SET {sets} WHERE account_id = '{account_id}'"  # noqa: S608


def _literal(value: datetime | str | int | None) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return f"'{iso(value) if isinstance(value, datetime) else value}'"


async def add(storage: AnyStorage, count: int, prefix: str = "acct") -> list[str]:
    ids = [f"{prefix}-{n:04d}" for n in range(count)]
    items = [
        ImportItem(
            account_id=account_id,
            realm_id=f"9130{n:012d}",
            refresh_token=f"refresh-{account_id}",
            access_token=f"access-{account_id}",
            token_expires_at=NOW + timedelta(minutes=30),
        )
        for n, account_id in enumerate(ids)
    ]
    await import_accounts(storage, items, now=NOW)
    return ids


async def test_counts_report_an_active_row_with_a_dead_token_as_expired(
    storage: AnyStorage, backend: Backend
) -> None:
    await add(storage, 6)
    dead = NOW - timedelta(seconds=1)
    await backend.execute_all(
        [
            update("acct-0000", token_expires_at=dead),
            update("acct-0001", status="expired"),
            update("acct-0002", status="needs_reconnect"),
            # A tombstone's old expiry does not make it expired.
            update("acct-0003", status="disconnected", token_expires_at=dead),
        ]
    )
    counts = await storage.status_page.status_counts(NOW)
    assert counts == {
        AccountStatus.ACTIVE: 2,
        AccountStatus.EXPIRED: 2,
        AccountStatus.NEEDS_RECONNECT: 1,
        AccountStatus.DISCONNECTED: 1,
    }
    for status, expected in counts.items():
        page = await storage.status_page.page(PageRequest(status=status), NOW)
        assert page.total == expected
        assert {row.status for row in page.rows} == {status}
    row = await storage.status_page.account("acct-0000", NOW)
    assert row.status is AccountStatus.EXPIRED


async def _scatter(backend: Backend, ids: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """Give every account a random status, due time, failure count and last failure."""
    rng = random.Random(seed)
    truth = {}
    rows = []
    for account_id in ids:
        status = rng.choice(["active", "active", "active", "expired", "needs_reconnect"])
        due = iso(NOW + timedelta(seconds=rng.randrange(-600, 7200)))
        failures = rng.choice([0, 0, 0, 1, 2, 5])
        failed_at = iso(NOW - timedelta(seconds=rng.randrange(0, 3600))) if failures else None
        # Ties on purpose: the id must break them, across page boundaries too.
        if rng.random() < 0.2:
            due = iso(NOW + timedelta(minutes=20))
        truth[account_id] = {"status": status, "due": due, "failures": failures, "at": failed_at}
        rows.append(
            update(
                account_id,
                status=status,
                reconnect_token_at=due,
                failure_count=failures,
                last_failure_at=failed_at,
            )
        )
    await backend.execute_all(rows)
    return truth


def _expected_order(
    truth: dict[str, dict[str, Any]], ids: list[str], sort: Sort, status: str | None
) -> list[str]:
    number = {account_id: n for n, account_id in enumerate(ids)}  # insert order is id order
    chosen = [a for a in ids if status is None or truth[a]["status"] == status]
    if sort is Sort.NEXT_REFRESH:

        def next_key(a: str) -> tuple[str, int]:
            scheduled = truth[a]["status"] in ("active", "expired")
            return (truth[a]["due"] if scheduled else "~", number[a])

        return sorted(chosen, key=next_key)
    if sort is Sort.FAILURES:
        return sorted(chosen, key=lambda a: (truth[a]["failures"], number[a]), reverse=True)
    return sorted(chosen, key=lambda a: (truth[a]["at"] or "", number[a]), reverse=True)


async def _walk(storage: AnyStorage, request: PageRequest) -> list[list[AccountRow]]:
    pages = []
    page = await storage.status_page.page(request, NOW)
    pages.append(page.rows)
    while page.next is not None:
        request = PageRequest(request.status, request.search, request.sort, page.next, None, 7)
        page = await storage.status_page.page(request, NOW)
        pages.append(page.rows)
    return pages


@pytest.mark.parametrize("sort", list(Sort))
@pytest.mark.parametrize("status", [None, "active", "needs_reconnect"])
async def test_paging_forward_and_back_visits_every_row_once_in_order(
    storage: AnyStorage, backend: Backend, sort: Sort, status: str | None
) -> None:
    ids = await add(storage, 60)
    truth = await _scatter(backend, ids, seed=3)
    wanted = _expected_order(truth, ids, sort, status)
    shown = AccountStatus(status) if status else None
    pages = await _walk(storage, PageRequest(shown, "", sort, None, None, 7))
    assert [row.account_id for rows in pages for row in rows] == wanted
    assert all(len(rows) == 7 for rows in pages[:-1])
    # Back from the last page to the first, page by page, through "previous".
    last = await storage.status_page.page(
        PageRequest(shown, "", sort, _cursor_before(pages), None, 7), NOW
    )
    assert [r.account_id for r in last.rows] == [r.account_id for r in pages[-1]]
    back = [last.rows]
    page = last
    while page.previous is not None:
        page = await storage.status_page.page(
            PageRequest(shown, "", sort, None, page.previous, 7), NOW
        )
        back.append(page.rows)
    assert [[r.account_id for r in rows] for rows in reversed(back)] == [
        [r.account_id for r in rows] for rows in pages
    ]
    first = await storage.status_page.page(PageRequest(shown, "", sort, None, None, 7), NOW)
    assert first.previous is None
    assert first.total == len(wanted)


def _cursor_before(pages: list[list[AccountRow]]) -> Cursor | None:
    """The cursor after which the last page starts (the last row of the page before)."""
    if len(pages) < 2:
        return None
    row = pages[-2][-1]
    return Cursor(row.sort_key, row.id)


async def test_search_finds_an_account_id_prefix_or_an_exact_realm(storage: AnyStorage) -> None:
    await add(storage, 30, prefix="north")
    await add(storage, 5, prefix="south")
    page = await storage.status_page.page(PageRequest(search="south-"), NOW)
    assert [row.account_id for row in page.rows] == [f"south-{n:04d}" for n in range(5)]
    page = await storage.status_page.page(PageRequest(search="north-002"), NOW)
    assert page.total == 10
    realm = (await storage.status_page.account("north-0017", NOW)).realm_id
    assert realm is not None
    page = await storage.status_page.page(PageRequest(search=realm), NOW)
    assert [row.account_id for row in page.rows] == ["north-0017"]
    page = await storage.status_page.page(PageRequest(search=realm[:-1]), NOW)
    assert page.rows == []  # a realm matches whole, never by prefix
    page = await storage.status_page.page(PageRequest(search="nobody"), NOW)
    assert page.total == 0


async def test_due_per_minute_overdue_and_next_due(storage: AnyStorage, backend: Backend) -> None:
    ids = await add(storage, 8)
    times = {
        "acct-0000": NOW - timedelta(minutes=3),  # overdue
        "acct-0001": NOW + timedelta(seconds=10),
        "acct-0002": NOW + timedelta(seconds=20),
        "acct-0003": NOW + timedelta(minutes=5, seconds=1),
        "acct-0004": NOW + timedelta(minutes=59),
        "acct-0005": NOW + timedelta(minutes=61),  # beyond the hour
        "acct-0006": NOW + timedelta(minutes=5),  # not scheduled: needs a reconnect
    }
    await backend.execute_all(
        [
            *(update(account_id, reconnect_token_at=due) for account_id, due in times.items()),
            update("acct-0006", status="needs_reconnect"),
            update("acct-0007", status="disconnected", reconnect_token_at=None),
        ]
    )
    queries = storage.status_page
    minutes = await queries.due_per_minute(NOW, timedelta(hours=1))
    assert [
        (m.minute.strftime("%H:%M"), m.count) for m in sorted(minutes, key=lambda m: m.minute)
    ] == [
        ("12:00", 2),
        ("12:05", 1),
        ("12:59", 1),
    ]
    assert await queries.overdue(NOW) == 1
    upcoming = await queries.next_due(NOW, 3)
    assert [row.account_id for row in upcoming] == ["acct-0001", "acct-0002", "acct-0003"]
    assert ids


async def test_attempts_per_minute_split_success_from_failure(storage: AnyStorage) -> None:
    await add(storage, 1)
    for seconds, outcome in [
        (-7200, "success"),
        (-130, "success"),
        (-125, "transient"),
        (-120, "invalid_grant"),
        (-5, "success"),
        (-4, "success"),
    ]:
        await storage.record_attempt(
            Attempt("acct-0000", NOW + timedelta(seconds=seconds), outcome, 120.0)
        )
    minutes = await storage.status_page.attempts_per_minute(NOW - timedelta(hours=1), NOW)
    assert [(m.minute.strftime("%H:%M"), m.succeeded, m.failed) for m in minutes] == [
        ("11:58", 1, 2),
        ("12:00", 2, 0),
    ]


async def test_near_hard_expiry_lists_connected_accounts_soonest_first(
    storage: AnyStorage, backend: Backend
) -> None:
    await add(storage, 5)
    hard = {
        "acct-0000": NOW + timedelta(days=40),
        "acct-0001": NOW + timedelta(days=3),
        "acct-0002": NOW + timedelta(days=20),
        "acct-0003": NOW + timedelta(days=1),  # disconnected: nothing left to expire
    }
    await backend.execute_all(
        [
            *(
                update(account_id, refresh_token_hard_expires_at=when)
                for account_id, when in hard.items()
            ),
            update("acct-0003", status="disconnected"),
        ]
    )
    count, rows = await storage.status_page.near_hard_expiry(NOW, timedelta(days=30), 1)
    assert count == 2
    assert [row.account_id for row in rows] == ["acct-0001"]


async def test_a_failure_note_stamps_last_failure_and_a_success_keeps_it(
    storage: AnyStorage,
) -> None:
    await add(storage, 1)
    account = await storage.load("acct-0000")
    later = NOW + timedelta(minutes=1)
    await record_failure(storage, account, status=AccountStatus.ACTIVE, error="HTTP 503", now=later)
    row = await storage.status_page.account("acct-0000", NOW)
    assert row.last_failure_at == later
    assert row.failure_count == 1
    assert row.last_error == "HTTP 503"

    # As the engine writes them: a refresh and a reconnect keep when it last failed,
    # and the policy's failure note stamps it anew.
    failed = await storage.load("acct-0000")
    fresh = TokenSet("A2", "R2", later, later + timedelta(hours=1), later + timedelta(days=100))
    refreshed = await save_refresh(storage, failed, fresh, now=later)
    await save_connection(storage, "acct-0000", refreshed.realm_id or "", fresh, now=later)
    assert (await storage.status_page.account("acct-0000", NOW)).last_failure_at == later
    current = await storage.load("acct-0000")
    again = later + timedelta(minutes=1)
    noted = POLICY.failed(current, TransientIntuitError("HTTP 502"), now=again)
    await storage.commit(AccountWrite(noted, current.version, tokens=False))
    assert (await storage.status_page.account("acct-0000", NOW)).last_failure_at == again


async def test_migration_3_backfills_the_last_failure_from_the_attempts(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as conn, conn:
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        for account_id, failures in (("sick", 2), ("well", 0)):
            conn.execute(
                "INSERT INTO accounts (account_id, status, failure_count, created_at, updated_at) "
                "VALUES (?, 'active', ?, ?, ?)",
                (account_id, failures, iso(NOW), iso(NOW)),
            )
        for account_id, at, outcome in (
            ("sick", NOW - timedelta(minutes=9), "transient"),
            ("sick", NOW - timedelta(minutes=4), "transient"),
            ("sick", NOW - timedelta(minutes=1), "success"),
            ("well", NOW - timedelta(minutes=2), "transient"),  # healed since
        ):
            conn.execute(
                "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms) "
                "VALUES (?, ?, ?, 1.0)",
                (account_id, iso(at), outcome),
            )
    storage = await Storage.open(db_path, Cipher([EncryptionKey.from_text(generate_key())]))
    try:
        sick = await storage.status_page.account("sick", NOW)
        well = await storage.status_page.account("well", NOW)
    finally:
        await storage.close()
    assert sick.last_failure_at == NOW - timedelta(minutes=4)
    assert well.last_failure_at is None


@pytest.mark.parametrize("sort", list(Sort))
@pytest.mark.parametrize("status", [None, *AccountStatus])
def test_every_page_query_walks_an_index_in_order(
    db_path: Path, sort: Sort, status: AccountStatus | None
) -> None:
    """No page sorts the table: each walks its sort's index, first page or later, either way."""
    with closing(sqlite3.connect(db_path)) as conn:
        conn.create_function("qbo_sha256", 1, sha256_hex)  # migration 4 hashes states
        for migration in MIGRATIONS:
            for statement in migration:
                conn.execute(statement)
        where, params = status_filter(status, NOW, for_page=True)
        for after, before in ((None, None), (Cursor("x", 5), None), (None, Cursor("x", 5))):
            request = PageRequest(status, "", sort, after, before, 50)
            sql, values = page_query(request, where, params)
            plan = " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", values))
            assert "TEMP B-TREE" not in plan, plan
            if after or before:
                assert plan.startswith("SEARCH accounts USING"), plan  # seeks, never walks
            index = {
                Sort.NEXT_REFRESH: "accounts_next_refresh",
                Sort.LAST_FAILURE: "accounts_last_failure",
                Sort.FAILURES: "accounts_failure_count",
            }[sort]
            assert index in plan, plan


async def test_every_postgresql_page_query_walks_an_index_in_order(cipher: Cipher) -> None:
    """Each sort's key is the expression its index holds, so a page can walk that index in
    order (seeking to its cursor), whatever the filter: with sorting priced out, no plan
    sorts. Which plan the server picks at scale is in docs (EXPLAIN at 100,000 accounts)."""
    async with fresh_database() as url:
        await (await PostgresStorage.open(url, cipher)).close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET enable_seqscan = off; SET enable_sort = off")
            for sort, status in itertools.product(Sort, [None, *AccountStatus]):
                index = {
                    Sort.NEXT_REFRESH: "accounts_next_refresh",
                    Sort.LAST_FAILURE: "accounts_last_failure",
                    Sort.FAILURES: "accounts_failure_count",
                }[sort]
                cursor = Cursor(5 if sort is Sort.FAILURES else iso(NOW) or "", 5)
                for after, before in ((None, None), (cursor, None), (None, cursor)):
                    params = PG_DIALECT.params()
                    where = status_conditions(status, NOW, params)
                    request = PageRequest(status, "", sort, after, before, 50)
                    sql = page_statement(request, where, params, PG_DIALECT)
                    rows = await conn.fetch(f"EXPLAIN {sql}", *params.values)
                    plan = " / ".join(row[0] for row in rows)
                    assert "Sort" not in plan, plan
                    assert index in plan, plan
                    if after or before:
                        assert "Index Cond: ((" in plan, plan  # seeks, never walks
        finally:
            await conn.close()


@pytest.mark.parametrize(
    ("sort", "key"),
    [
        (Sort.NEXT_REFRESH, "x"),
        (Sort.NEXT_REFRESH, 3),
        (Sort.LAST_FAILURE, "~"),
        (Sort.FAILURES, ""),
    ],
)
async def test_a_page_link_edited_by_hand_shows_the_first_page(
    storage: AnyStorage, sort: Sort, key: str | int
) -> None:
    await add(storage, 12)
    first = await storage.status_page.page(PageRequest(sort=sort, limit=5), NOW)
    for after, before in ((Cursor(key, 3), None), (None, Cursor(key, 3))):
        page = await storage.status_page.page(PageRequest(None, "", sort, after, before, 5), NOW)
        assert [row.account_id for row in page.rows] == [row.account_id for row in first.rows]
        assert page.total == 12
