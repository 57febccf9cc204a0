"""The storage port on SQLite, against real files and real AES-GCM keys.

Every check reads what an operator would read: the rows (with the sqlite3
module, not through Storage), the file's bytes and mode, the error message.
What is written is decided as the engine decides it (its policy), and goes
through the port's methods only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from qbo_daemon.core.errors import (
    AccountNotFoundError,
    DatabaseLockedError,
    DecryptionError,
    MissingKeyError,
    OAuthStateError,
    StaleWriteError,
    StorageError,
)
from qbo_daemon.core.models import Account, AccountStatus, ImportItem, TokenSet
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.repository import (
    Attempt,
    ClaimedState,
    DatabaseLock,
    StateRecord,
    Storage,
)
from qbo_daemon.store.schema import MIGRATIONS, SCHEMA_VERSION, sha256_hex
from qbo_daemon.store.states import answer_hash
from tests.harness import attempts
from tests.store.writes import (
    LEAD,
    forget_tokens,
    import_accounts,
    record_failure,
    save_connection,
    save_refresh,
)

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)

# Distinctive values: none of them may ever appear in the database files.
REALM = "REALM-4620816365172548590"
ACCESS = "ACCESS-eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0-q7Zx"
REFRESH = "REFRESH-AB11760125392vXkQm3pLr8sTn2WbYc4Hd6Jf"


def _key() -> EncryptionKey:
    return EncryptionKey.from_text(generate_key())


def tokens(
    access: str = ACCESS,
    refresh: str = REFRESH,
    *,
    at: datetime = NOW,
    lifetime: timedelta = HOUR,
    hard: datetime | None = None,
) -> TokenSet:
    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        obtained_at=at,
        token_expires_at=at + lifetime,
        refresh_token_expires_at=at + timedelta(days=100),
        refresh_token_hard_expires_at=hard,
    )


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file the way an operator would: a separate sqlite3 connection."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def execute(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(sql, params)


def row(path: Path, account_id: str, columns: str) -> tuple[Any, ...]:
    sql = f"SELECT {columns} FROM accounts WHERE account_id = ?"  # noqa: S608 (test constants)
    rows = query(path, sql, (account_id,))
    assert len(rows) == 1, rows
    return rows[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_a() -> EncryptionKey:
    return _key()


@pytest.fixture
def key_b() -> EncryptionKey:
    return _key()


@pytest.fixture
def cipher(key_a: EncryptionKey) -> Cipher:
    return Cipher([key_a])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    return tmp_path / "data" / "qbo.sqlite3"


@pytest.fixture
async def storage(db_path: Path, cipher: Cipher) -> AsyncIterator[Storage]:
    store = await Storage.open(db_path, cipher)
    try:
        yield store
    finally:
        await store.close()


# -- writes as the engine decides them ------------------------------------------


async def connect(storage: Storage, account_id: str = "acct-1", **kw: Any) -> Account:
    return await save_connection(storage, account_id, REALM, tokens(**kw), now=NOW)


# -- a new database -----------------------------------------------------------


async def test_new_database_is_wal_full_current_and_private(
    storage: Storage, db_path: Path
) -> None:
    await connect(storage)
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    # synchronous is per connection: check the two the storage writes and reads with.
    for conn in (storage._db._writer, storage._db._reader):
        cursor = await conn.execute("PRAGMA synchronous")
        found = await cursor.fetchone()
        assert found is not None
        assert tuple(found) == (2,)  # FULL
        await cursor.close()
    # The database and its WAL companions hold account data: owner only, from the start.
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        assert mode(path) == 0o600, (path, oct(mode(path)))


async def test_reopen_is_idempotent(db_path: Path, cipher: Cipher) -> None:
    first = await Storage.open(db_path, cipher)
    await connect(first)
    await first.close()
    second = await Storage.open(db_path, cipher)
    try:
        assert (await second.load("acct-1")).refresh_token == REFRESH
        assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    finally:
        await second.close()


# -- migrations ---------------------------------------------------------------


def build_version_1(path: Path, cipher: Cipher) -> None:
    """A database as qbo-daemon's schema version 1 left it, with one account."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def enc(column: str, value: str) -> str:
        return cipher.encrypt(value, table="accounts", column=column, row_key="legacy-1")

    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO accounts (account_id, status, realm_id, access_token, refresh_token, "
            "key_id, token_expires_at, reconnect_token_at, refresh_token_expires_at, "
            "failure_count, last_error, last_refreshed_at, version, created_at, updated_at) "
            "VALUES (?, 'expired', ?, ?, ?, ?, ?, ?, ?, 2, 'timeout', ?, 7, ?, ?)",
            (
                "legacy-1",
                enc("realm_id", REALM),
                enc("access_token", ACCESS),
                enc("refresh_token", REFRESH),
                cipher.primary_key_id,
                "2024-06-01T10:00:00.000000Z",
                "2024-06-01T09:50:00.000000Z",
                "2024-09-09T09:00:00.000000Z",
                "2024-06-01T09:00:00.000000Z",
                "2024-01-01T00:00:00.000000Z",
                "2024-06-01T09:00:00.000000Z",
            ),
        )
        conn.execute(
            "INSERT INTO oauth_states (state, account_id, created_at, expires_at) "
            "VALUES ('old-state', 'legacy-2', ?, ?)",
            ("2025-03-01T11:55:00.000000Z", "2025-03-01T12:05:00.000000Z"),
        )
        conn.execute(
            "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms) "
            "VALUES ('legacy-1', '2024-06-01T09:00:00.000000Z', 'transient', 30000.0)"
        )


def columns(path: Path, table: str) -> set[str]:
    return {r[1] for r in query(path, f"PRAGMA table_info({table})")}


async def test_version_1_database_is_upgraded_and_keeps_its_rows(
    db_path: Path, cipher: Cipher
) -> None:
    build_version_1(db_path, cipher)
    assert "refresh_token_hard_expires_at" not in columns(db_path, "accounts")

    storage = await Storage.open(db_path, cipher)
    try:
        assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert "refresh_token_hard_expires_at" in columns(db_path, "accounts")
        assert "outcome" in columns(db_path, "oauth_states")
        indexes = query(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")
        assert ("refresh_attempts_account",) in indexes

        await storage.verify_keys()
        old = await storage.load("legacy-1")
        assert (old.realm_id, old.access_token, old.refresh_token) == (REALM, ACCESS, REFRESH)
        assert old.status is AccountStatus.EXPIRED
        assert (old.failure_count, old.last_error, old.version) == (2, "timeout", 7)
        assert old.token_expires_at == datetime(2024, 6, 1, 10, tzinfo=UTC)
        assert old.created_at == datetime(2024, 1, 1, tzinfo=UTC)
        assert old.refresh_token_hard_expires_at is None
        assert [a.outcome for a in attempts(db_path, "legacy-1")] == ["transient"]

        # The old row takes new writes, including the new column.
        hard = NOW + timedelta(days=1500)
        await save_refresh(storage, old, tokens("A2", "R2", hard=hard), now=NOW)
        assert row(db_path, "legacy-1", "version, status, refresh_token_hard_expires_at") == (
            8,
            "active",
            "2029-04-09T12:00:00.000000Z",
        )
        # A state issued by the old version still completes its connect flow.
        claim = await storage.consume_state("old-state", answer_hash("c", None), now=NOW)
        assert claim.account_id == "legacy-2"
        await storage.finish_state("old-state", "connected")
        assert await storage.get_state("old-state") == StateRecord("legacy-2", "connected")
    finally:
        await storage.close()


async def test_newer_schema_is_refused_clearly(db_path: Path, cipher: Cipher) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.create_function("qbo_sha256", 1, sha256_hex)  # migration 4 hashes states
        for migration in MIGRATIONS:
            for statement in migration:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(StorageError) as caught:
        await Storage.open(db_path, cipher)
    message = str(caught.value)
    assert str(db_path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "newer" in message
    assert "upgrade qbo-daemon" in message
    assert query(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]


def write_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"certainly not an SQLite database\n" * 200)


def new_threads(before: set[threading.Thread], wait: float = 5.0) -> set[threading.Thread]:
    """Threads started since ``before`` that are still alive after ``wait`` seconds."""
    before = before | {threading.current_thread()}  # run in a worker: not that one
    deadline = time.monotonic() + wait
    while (extra := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return extra


async def test_a_file_that_is_not_a_database_is_refused_without_leaking(
    db_path: Path, cipher: Cipher
) -> None:
    write_garbage(db_path)
    before = set(threading.enumerate())
    with pytest.raises(StorageError, match="file is not a database") as caught:
        await Storage.open(db_path, cipher)
    assert str(db_path) in str(caught.value)
    # No aiosqlite worker thread is left behind (it would keep the process alive).
    assert await asyncio.to_thread(new_threads, before) == set()


# -- accounts -----------------------------------------------------------------


async def test_save_connection_round_trip_and_utc_text(storage: Storage, db_path: Path) -> None:
    local_now = NOW.astimezone(timezone(timedelta(hours=2)))  # same instant, not UTC
    saved = await save_connection(storage, "acct-1", REALM, tokens(at=local_now), now=local_now)
    loaded = await storage.load("acct-1")
    assert loaded == saved
    assert loaded.id > 0
    assert (loaded.realm_id, loaded.access_token, loaded.refresh_token) == (
        REALM,
        ACCESS,
        REFRESH,
    )
    assert loaded.status is AccountStatus.ACTIVE
    assert loaded.version == 1
    assert loaded.token_expires_at == NOW + HOUR
    assert loaded.token_expires_at.tzinfo is UTC
    assert loaded.reconnect_token_at == NOW + HOUR - LEAD

    stored = row(
        db_path,
        "acct-1",
        "status, version, key_id, token_expires_at, reconnect_token_at, "
        "refresh_token_expires_at, last_refreshed_at, created_at, updated_at",
    )
    assert stored == (
        "active",
        1,
        storage.primary_key_id,
        "2025-03-01T13:00:00.000000Z",
        "2025-03-01T12:50:00.000000Z",
        "2025-06-09T12:00:00.000000Z",
        "2025-03-01T12:00:00.000000Z",
        "2025-03-01T12:00:00.000000Z",
        "2025-03-01T12:00:00.000000Z",
    )
    secrets = row(db_path, "acct-1", "realm_id, access_token, refresh_token")
    for value in secrets:
        assert value.startswith(f"v1.{storage.primary_key_id}.")

    listed = await storage.list_accounts()
    assert [(a.account_id, a.realm_id, a.access_token, a.refresh_token) for a in listed] == [
        ("acct-1", REALM, None, None)
    ]
    with pytest.raises(AccountNotFoundError, match="nope"):
        await storage.load("nope")
    assert await storage.find("nope") is None


async def test_short_lived_token_is_due_at_half_life(storage: Storage) -> None:
    saved = await connect(storage, lifetime=timedelta(minutes=4))
    assert saved.reconnect_token_at == NOW + timedelta(minutes=2)


async def test_reconnect_replaces_tokens_and_reactivates(storage: Storage, db_path: Path) -> None:
    first = await connect(storage)
    failed = await record_failure(
        storage, first, status=AccountStatus.NEEDS_RECONNECT, error="invalid_grant", now=NOW
    )
    assert row(db_path, "acct-1", "status, version") == ("needs_reconnect", 2)
    assert await storage.schedule_entries() == []

    later = NOW + timedelta(days=3)
    again = await save_connection(
        storage, "acct-1", "REALM-2", tokens("ACCESS-2", "REFRESH-2", at=later), now=later
    )
    assert again.version == failed.version + 1 == 3
    loaded = await storage.load("acct-1")
    assert loaded == again
    assert (loaded.realm_id, loaded.access_token, loaded.refresh_token) == (
        "REALM-2",
        "ACCESS-2",
        "REFRESH-2",
    )
    assert loaded.status is AccountStatus.ACTIVE
    assert (loaded.failure_count, loaded.last_error) == (0, None)
    assert loaded.created_at == NOW
    assert row(db_path, "acct-1", "status, version, failure_count, last_error, created_at") == (
        "active",
        3,
        0,
        None,
        "2025-03-01T12:00:00.000000Z",
    )
    assert query(db_path, "SELECT COUNT(*) FROM accounts") == [(1,)]
    assert [e.account_id for e in await storage.schedule_entries()] == ["acct-1"]


async def test_no_secret_in_the_database_files(storage: Storage, db_path: Path) -> None:
    account = await connect(storage, account_id="acct-plaintext-marker")
    await save_refresh(storage, account, tokens(ACCESS + "-2", REFRESH + "-2"), now=NOW + HOUR)
    files = [db_path, Path(f"{db_path}-wal")]

    def contents() -> bytes:
        return b"".join(path.read_bytes() for path in files if path.exists())

    data = contents()
    assert b"acct-plaintext-marker" in data  # the search does find what is there
    for secret in (REALM, ACCESS, REFRESH, "4620816365172548590", "AB11760125392vXkQm3pLr8"):
        assert secret.encode() not in data, secret
    await storage.close()  # checkpoints the WAL into the main file
    data = contents()
    assert b"acct-plaintext-marker" in data
    for secret in (REALM, ACCESS, REFRESH):
        assert secret.encode() not in data, secret


async def test_ciphertext_moved_to_another_row_or_column_does_not_decrypt(
    storage: Storage, db_path: Path
) -> None:
    await connect(storage, account_id="victim")
    await save_connection(storage, "attacker", "REALM-X", tokens("ACCESS-X", "REFRESH-X"), now=NOW)
    execute(
        db_path,
        "UPDATE accounts SET refresh_token = "
        "(SELECT refresh_token FROM accounts WHERE account_id = 'victim') "
        "WHERE account_id = 'attacker'",
    )
    with pytest.raises(DecryptionError, match="copied from another row") as caught:
        await storage.load("attacker")
    assert "'attacker'" in str(caught.value)
    assert REFRESH not in str(caught.value)
    assert (await storage.load("victim")).refresh_token == REFRESH

    # Same row, another column: refused as well.
    execute(
        db_path,
        "UPDATE accounts SET access_token = refresh_token WHERE account_id = 'victim'",
    )
    with pytest.raises(DecryptionError, match="access_token"):
        await storage.load("victim")


async def test_missing_key_is_named_at_start(
    db_path: Path, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    first = await Storage.open(db_path, Cipher([key_a]))
    await connect(first)
    await first.close()

    other = await Storage.open(db_path, Cipher([key_b]))
    try:
        with pytest.raises(MissingKeyError) as caught:
            await other.verify_keys()
        assert caught.value.key_id == key_a.key_id
        assert key_a.key_id in str(caught.value)
        assert "encryption_keys" in str(caught.value)
        with pytest.raises(MissingKeyError):
            await other.load("acct-1")
    finally:
        await other.close()


# -- compare-and-swap and group commit ----------------------------------------


async def test_stale_save_refresh_changes_nothing(storage: Storage, db_path: Path) -> None:
    v1 = await connect(storage)
    v2 = await save_refresh(storage, v1, tokens("ACCESS-2", "REFRESH-2"), now=NOW)
    assert v2.version == 2
    before = query(db_path, "SELECT * FROM accounts")

    attempt = Attempt("acct-1", NOW, "success", 120.0, intuit_tid="tid-stale")
    with pytest.raises(StaleWriteError) as caught:
        await save_refresh(storage, v1, tokens("ACCESS-3", "REFRESH-3"), now=NOW, attempt=attempt)
    assert (caught.value.account_id, caught.value.expected_version) == ("acct-1", 1)
    assert "'acct-1' changed since version 1" in str(caught.value)
    assert query(db_path, "SELECT * FROM accounts") == before
    assert query(db_path, "SELECT COUNT(*) FROM refresh_attempts") == [(0,)]
    assert (await storage.load("acct-1")).refresh_token == "REFRESH-2"


async def test_two_concurrent_refreshes_of_one_version_one_wins(
    storage: Storage, db_path: Path
) -> None:
    v1 = await connect(storage)
    results = await asyncio.gather(
        save_refresh(storage, v1, tokens("ACCESS-A", "REFRESH-A"), now=NOW),
        save_refresh(storage, v1, tokens("ACCESS-B", "REFRESH-B"), now=NOW),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Account)]
    losers = [r for r in results if isinstance(r, StaleWriteError)]
    assert (len(winners), len(losers)) == (1, 1), results
    stored = await storage.load("acct-1")
    assert stored.refresh_token == winners[0].refresh_token
    assert stored.version == 2
    assert row(db_path, "acct-1", "version") == (2,)


async def test_group_commit_lands_every_write_and_fails_the_stale_one_alone(
    storage: Storage, db_path: Path
) -> None:
    accounts = [await connect(storage, account_id=f"acct-{n:02d}") for n in range(40)]
    stale = accounts[7]
    await save_refresh(storage, stale, tokens("ACCESS-1st", "REFRESH-1st"), now=NOW)

    commits: list[str] = []
    await storage._db._writer.set_trace_callback(
        lambda sql: commits.append(sql) if sql.startswith("COMMIT") else None
    )
    later = NOW + timedelta(minutes=50)
    results = await asyncio.gather(
        *(
            save_refresh(
                storage,
                account,
                tokens(f"ACCESS-{account.account_id}", f"REFRESH-{account.account_id}", at=later),
                now=later,
                attempt=Attempt(account.account_id, later, "success", 200.0, "tid"),
            )
            for account in accounts
        ),
        return_exceptions=True,
    )
    commit_count = len(commits)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1
    assert isinstance(failed[0], StaleWriteError)
    assert failed[0].account_id == stale.account_id
    assert commit_count < len(accounts)  # shared transactions, not one fsync per write

    stored = dict(query(db_path, "SELECT account_id, version FROM accounts"))
    assert stored.pop(stale.account_id) == 2
    assert set(stored.values()) == {2}
    assert len(stored) == 39
    for account in accounts:
        loaded = await storage.load(account.account_id)
        if account is stale:
            assert loaded.refresh_token == "REFRESH-1st"
        else:
            assert loaded.refresh_token == f"REFRESH-{account.account_id}"
            assert loaded.reconnect_token_at == later + HOUR - LEAD
    assert query(db_path, "SELECT COUNT(*) FROM refresh_attempts") == [(39,)]


async def test_close_commits_what_is_queued(db_path: Path, cipher: Cipher) -> None:
    storage = await Storage.open(db_path, cipher)
    accounts = [await connect(storage, account_id=f"acct-{n}") for n in range(5)]
    pending = [
        asyncio.create_task(
            save_refresh(storage, a, tokens("ACCESS-2", f"R2-{a.account_id}"), now=NOW)
        )
        for a in accounts
    ]
    await asyncio.sleep(0)  # let them queue
    await storage.close()
    assert all(task.done() and task.exception() is None for task in pending)
    assert query(db_path, "SELECT DISTINCT version FROM accounts") == [(2,)]
    with pytest.raises(StorageError, match="closed"):
        await save_refresh(storage, accounts[0], tokens(), now=NOW)


# -- failures and disconnects -------------------------------------------------


async def test_record_failure_counts_and_sets_status(storage: Storage, db_path: Path) -> None:
    account = await connect(storage)
    first = await record_failure(
        storage,
        account,
        status=AccountStatus.ACTIVE,
        error="connection reset",
        now=NOW,
        attempt=Attempt("acct-1", NOW, "transient", 30000.0, error="connection reset"),
    )
    assert row(db_path, "acct-1", "status, failure_count, last_error, version") == (
        "active",
        1,
        "connection reset",
        2,
    )
    later = NOW + HOUR
    second = await record_failure(
        storage, first, status=AccountStatus.EXPIRED, error="HTTP 503", now=later
    )
    assert second.failure_count == 2
    assert row(db_path, "acct-1", "status, failure_count, last_error, version, updated_at") == (
        "expired",
        2,
        "HTTP 503",
        3,
        "2025-03-01T13:00:00.000000Z",
    )
    assert await storage.load("acct-1") == second
    assert [(a.outcome, a.error) for a in attempts(db_path, "acct-1")] == [
        ("transient", "connection reset")
    ]
    # Expired accounts are still scheduled; needs_reconnect ones are not.
    assert [e.status for e in await storage.schedule_entries()] == [AccountStatus.EXPIRED]
    with pytest.raises(StaleWriteError):
        await record_failure(storage, first, status=AccountStatus.EXPIRED, error="x", now=later)
    third = await record_failure(
        storage, second, status=AccountStatus.NEEDS_RECONNECT, error="invalid_grant", now=later
    )
    assert third.failure_count == 3
    assert await storage.schedule_entries() == []
    assert await storage.status_counts() == {"needs_reconnect": 1}

    # A successful refresh clears the failure bookkeeping.
    await save_refresh(storage, third, tokens(at=later), now=later)
    assert row(db_path, "acct-1", "status, failure_count, last_error") == ("active", 0, None)


async def test_forget_tokens_leaves_a_tombstone(storage: Storage, db_path: Path) -> None:
    account = await connect(storage)
    gone = await forget_tokens(storage, account, now=NOW + HOUR)
    assert gone.status is AccountStatus.DISCONNECTED
    assert row(
        db_path, "acct-1", "status, access_token, refresh_token, reconnect_token_at, version"
    ) == ("disconnected", None, None, None, 2)
    loaded = await storage.load("acct-1")
    assert (loaded.access_token, loaded.refresh_token) == (None, None)
    assert loaded.status is AccountStatus.DISCONNECTED
    assert await storage.schedule_entries() == []
    with pytest.raises(StaleWriteError):
        await forget_tokens(storage, account, now=NOW + HOUR)
    with pytest.raises(StaleWriteError):  # a refresh that was in flight cannot resurrect it
        await save_refresh(storage, account, tokens(), now=NOW + HOUR)
    assert row(db_path, "acct-1", "refresh_token, version") == (None, 2)


# -- import -------------------------------------------------------------------


async def test_import_is_all_or_nothing(storage: Storage, db_path: Path) -> None:
    existing = await connect(storage, account_id="kept")
    before = query(db_path, "SELECT * FROM accounts")
    items = [
        ImportItem("new-1", REALM, "REFRESH-new-1"),
        ImportItem("kept", "REALM-overwritten", "REFRESH-overwritten"),
        ImportItem(cast(str, None), REALM, "REFRESH-bad"),  # NOT NULL account_id
        ImportItem("new-2", REALM, "REFRESH-new-2"),
    ]
    with pytest.raises(StorageError, match="database write failed: NOT NULL"):
        await import_accounts(storage, items, now=NOW)
    assert query(db_path, "SELECT * FROM accounts") == before
    assert await storage.load("kept") == existing

    # A failure the database raises late (here a trigger) rolls back the earlier items too.
    execute(
        db_path,
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON accounts "
        "WHEN NEW.account_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
    )
    items[2] = ImportItem("poison", REALM, "REFRESH-poison")
    with pytest.raises(StorageError, match="poisoned row"):
        await import_accounts(storage, items, now=NOW)
    assert query(db_path, "SELECT * FROM accounts") == before

    # The storage is still usable: nothing was left half-open.
    del items[2]
    stored = await import_accounts(storage, items, now=NOW)
    assert [(r.account_id, r.existed) for r in stored] == [
        ("new-1", False),
        ("kept", True),
        ("new-2", False),
    ]
    assert query(db_path, "SELECT account_id FROM accounts ORDER BY account_id") == [
        ("kept",),
        ("new-1",),
        ("new-2",),
    ]


async def test_import_without_a_valid_access_token_is_due_at_once(
    storage: Storage, db_path: Path
) -> None:
    items = [
        ImportItem("no-access", REALM, "REFRESH-1"),
        ImportItem("no-expiry", REALM, "REFRESH-2", access_token="ACCESS-2"),
        ImportItem(
            "expired", REALM, "REFRESH-3", access_token="ACCESS-3", token_expires_at=NOW - HOUR
        ),
        ImportItem(
            "valid",
            REALM,
            "REFRESH-4",
            access_token="ACCESS-4",
            token_expires_at=NOW + timedelta(minutes=50),
            refresh_token_expires_at=NOW + timedelta(days=30),
        ),
    ]
    stored = [r.account for r in await import_accounts(storage, items, now=NOW)]
    assert all(a and a.version == 1 and a.status is AccountStatus.ACTIVE for a in stored)
    due = {e.account_id: e.reconnect_token_at for e in await storage.schedule_entries()}
    assert due == {
        "no-access": NOW,
        "no-expiry": NOW,
        "expired": NOW,
        "valid": NOW + timedelta(minutes=40),
    }
    assert row(db_path, "no-access", "reconnect_token_at, refresh_token_expires_at") == (
        "2025-03-01T12:00:00.000000Z",
        "2025-06-09T12:00:00.000000Z",  # 100 days when unknown
    )
    assert row(db_path, "valid", "refresh_token_expires_at") == ("2025-03-31T12:00:00.000000Z",)
    valid = await storage.load("valid")
    assert (valid.access_token, valid.refresh_token, valid.realm_id) == (
        "ACCESS-4",
        "REFRESH-4",
        REALM,
    )
    assert (await storage.load("no-access")).refresh_token == "REFRESH-1"


# -- OAuth states -------------------------------------------------------------


async def test_oauth_state_is_single_use(storage: Storage, db_path: Path) -> None:
    ttl = timedelta(minutes=10)
    first, other = answer_hash("code-1", None), answer_hash("code-2", None)
    await storage.create_state("state-1", "acct-1", now=NOW, ttl=ttl)
    assert await storage.get_state("state-1") == StateRecord("acct-1", None)
    claim = await storage.consume_state("state-1", first, now=NOW + timedelta(minutes=1))
    assert claim == ClaimedState("acct-1", allow_realm_change=False, code_verifier=None)
    with pytest.raises(OAuthStateError, match="already been used") as used:
        await storage.consume_state("state-1", other, now=NOW + timedelta(minutes=2))
    assert used.value.reason == "used"
    with pytest.raises(OAuthStateError, match="already been used") as replayed:
        await storage.consume_state("state-1", first, now=NOW + timedelta(minutes=2))
    assert replayed.value.reason == "replayed"
    await storage.finish_state("state-1", "connected")
    assert await storage.get_state("state-1") == StateRecord("acct-1", "connected")

    with pytest.raises(OAuthStateError) as unknown:
        await storage.consume_state("never-issued", first, now=NOW)
    assert unknown.value.reason == "unknown"
    assert await storage.get_state("never-issued") is None

    await storage.create_state("state-2", "acct-2", now=NOW, ttl=ttl)
    with pytest.raises(OAuthStateError, match="expired") as expired:
        await storage.consume_state("state-2", first, now=NOW + ttl)
    assert expired.value.reason == "expired"
    # A refused state is not marked used: it stays expired, not "used".
    assert query(
        db_path, "SELECT used_at FROM oauth_states WHERE state_hash = ?", (sha256_hex("state-2"),)
    ) == [(None,)]
    with pytest.raises(OAuthStateError) as again:
        await storage.consume_state("state-2", first, now=NOW + ttl)
    assert again.value.reason == "expired"

    with pytest.raises(StorageError):  # a state value is never issued twice
        await storage.create_state("state-1", "acct-3", now=NOW, ttl=ttl)
    assert await storage.get_state("state-1") == StateRecord("acct-1", "connected")


async def test_old_oauth_states_are_purged(storage: Storage, db_path: Path) -> None:
    ttl = timedelta(minutes=10)
    await storage.create_state("old", "acct-1", now=NOW, ttl=ttl)
    await storage.create_state("new", "acct-2", now=NOW + timedelta(days=2), ttl=ttl)
    assert query(db_path, "SELECT state_hash FROM oauth_states") == [(sha256_hex("new"),)]


# -- refresh attempts ---------------------------------------------------------


async def write_attempts(storage: Storage, count: int, start: int = 0) -> None:
    for first in range(start, start + count, 100):
        await asyncio.gather(
            *(
                storage.record_attempt(
                    Attempt("acct-1", NOW + timedelta(seconds=n), "invalid_client", 1.5)
                )
                for n in range(first, min(first + 100, start + count))
            )
        )


async def test_refresh_attempts_stay_bounded(db_path: Path, cipher: Cipher) -> None:
    keep = 50
    limit = keep + 1000
    storage = await Storage.open(db_path, cipher, attempts_keep=keep)
    try:
        for chunk in range(25):
            await write_attempts(storage, 100, chunk * 100)
            (count,) = query(db_path, "SELECT COUNT(*) FROM refresh_attempts")[0]
            assert count <= limit, (chunk, count)
        newest = attempts(db_path, limit=1)
        assert newest[0].started_at == NOW + timedelta(seconds=2499)
    finally:
        await storage.close()

    # The bound holds across restarts too: each run writing fewer than a trim's worth.
    for run in range(3):
        storage = await Storage.open(db_path, cipher, attempts_keep=keep)
        try:
            await write_attempts(storage, 900, 10_000 * (run + 1))
        finally:
            await storage.close()
        (count,) = query(db_path, "SELECT COUNT(*) FROM refresh_attempts")[0]
        assert count <= limit, (run, count)


# -- the database lock --------------------------------------------------------

LOCK_SCRIPT = """
import sys, time
from pathlib import Path
from qbo_daemon.core.errors import DatabaseLockedError
from qbo_daemon.store.repository import DatabaseLock
lock = DatabaseLock(Path(sys.argv[1]))  # kept referenced: closing its file would unlock
try:
    lock.acquire()
except DatabaseLockedError as exc:
    print(exc, flush=True)
    sys.exit(3)
print("locked", flush=True)
if sys.argv[2] == "hold":
    time.sleep(600)
"""


def lock_process(db: Path, action: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", LOCK_SCRIPT, str(db), action],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.fixture
def holder(db_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the database lock."""
    proc = lock_process(db_path, "hold")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_second_lock_in_the_same_process_is_refused(db_path: Path) -> None:
    with DatabaseLock(db_path) as first:
        assert first.path == db_path.with_name("qbo.sqlite3.lock")
        with pytest.raises(DatabaseLockedError) as caught:
            DatabaseLock(db_path).acquire()
        assert str(db_path) in str(caught.value)
        assert "already running" in str(caught.value)
    with DatabaseLock(db_path):  # released on exit
        pass


def test_another_process_is_refused(db_path: Path) -> None:
    with DatabaseLock(db_path):
        proc = lock_process(db_path, "try")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3, out
        assert str(db_path) in out
        assert "only one daemon" in out
    proc = lock_process(db_path, "try")
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (0, "locked")


def test_lock_of_a_killed_process_is_released(db_path: Path, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(DatabaseLockedError, match=re.escape(str(db_path))):
        DatabaseLock(db_path).acquire()
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL
    with DatabaseLock(db_path):
        pass


# -- key rotation ---------------------------------------------------------------


def key_ids_on_disk(path: Path) -> set[str]:
    found = set()
    for key_id, *secrets in query(
        path, "SELECT key_id, realm_id, access_token, refresh_token FROM accounts"
    ):
        found.add(key_id)
        found.update(Cipher.key_id_of(value) for value in secrets if value is not None)
    return found


async def test_reencrypt_moves_every_row_to_the_new_key(
    db_path: Path, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    old = await Storage.open(db_path, Cipher([key_a]))
    for n in range(23):
        await connect(old, account_id=f"acct-{n:02d}", access=f"A-{n}", refresh=f"R-{n}")
    await forget_tokens(old, await old.load("acct-05"), now=NOW)  # a tombstone
    await old.close()
    assert key_ids_on_disk(db_path) == {key_a.key_id}

    rotating = await Storage.open(db_path, Cipher([key_b, key_a]))
    try:
        await rotating.verify_keys()
        results = [await rotating.reencrypt(batch=10) for _ in range(3)]
        assert results == [(10, 13), (10, 3), (3, 0)]
        assert await rotating.reencrypt() == (0, 0)
    finally:
        await rotating.close()
    assert key_ids_on_disk(db_path) == {key_b.key_id}

    new_only = await Storage.open(db_path, Cipher([key_b]))
    try:
        await new_only.verify_keys()
        for n in range(23):
            account = await new_only.load(f"acct-{n:02d}")
            assert account.realm_id == REALM
            if n == 5:
                assert account.refresh_token is None
            else:
                assert (account.access_token, account.refresh_token) == (f"A-{n}", f"R-{n}")
    finally:
        await new_only.close()


async def test_refresh_during_reencrypt_is_not_lost(
    db_path: Path, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    old = await Storage.open(db_path, Cipher([key_a]))
    for n in range(20):
        await connect(old, account_id=f"acct-{n:02d}")
    await old.close()

    storage = await Storage.open(db_path, Cipher([key_b, key_a]))
    try:
        # Both read before either writes, then race to the writer.
        racing = await storage.load("acct-10")
        waiting = await storage.load("acct-15")
        saved, (done, remaining) = await asyncio.gather(
            save_refresh(storage, racing, tokens("ACCESS-new", "REFRESH-new"), now=NOW),
            storage.reencrypt(),
        )
        assert saved.refresh_token == "REFRESH-new"
        assert (done, remaining) == (19, 0)

        # A refresh read before the re-encryption finds the row moved on only in
        # bookkeeping (same refresh token): it re-reads and writes again, as the
        # refresher does, and its tokens land.
        with pytest.raises(StaleWriteError):
            await save_refresh(storage, waiting, tokens("ACCESS-15", "REFRESH-15"), now=NOW)
        current = await storage.load("acct-15")
        assert current.refresh_token == waiting.refresh_token
        await save_refresh(storage, current, tokens("ACCESS-15", "REFRESH-15"), now=NOW)
    finally:
        await storage.close()
    assert key_ids_on_disk(db_path) == {key_b.key_id}

    new_only = await Storage.open(db_path, Cipher([key_b]))
    try:
        await new_only.verify_keys()
        assert (await new_only.load("acct-10")).refresh_token == "REFRESH-new"
        assert (await new_only.load("acct-15")).refresh_token == "REFRESH-15"
        assert (await new_only.load("acct-03")).refresh_token == REFRESH
    finally:
        await new_only.close()


# -- a database that refuses writes -------------------------------------------


async def set_query_only(storage: Storage, on: bool) -> None:
    """Make the writer connection refuse writes (works as root, unlike chmod)."""
    await storage._db._writer.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")


async def test_failing_write_is_a_storage_error_and_writes_nothing(
    storage: Storage, db_path: Path
) -> None:
    account = await connect(storage)
    before = query(db_path, "SELECT * FROM accounts")
    await set_query_only(storage, True)

    attempt = Attempt("acct-1", NOW, "success", 90.0, intuit_tid="tid-1")
    with pytest.raises(StorageError, match=r"database write failed: .*readonly"):
        await save_refresh(
            storage, account, tokens("ACCESS-2", "REFRESH-2"), now=NOW, attempt=attempt
        )
    with pytest.raises(StorageError, match="readonly"):
        await import_accounts(
            storage,
            [ImportItem("imp-1", REALM, "R-1"), ImportItem("imp-2", REALM, "R-2")],
            now=NOW,
        )
    with pytest.raises(StorageError, match="readonly"):
        await save_connection(storage, "acct-2", REALM, tokens(), now=NOW)
    with pytest.raises(StorageError, match="readonly"):
        await storage.create_state("state-1", "acct-1", now=NOW, ttl=HOUR)
    with pytest.raises(StorageError, match="readonly"):
        await record_failure(storage, account, status=AccountStatus.EXPIRED, error="x", now=NOW)

    assert query(db_path, "SELECT * FROM accounts") == before
    assert query(db_path, "SELECT COUNT(*) FROM refresh_attempts") == [(0,)]
    assert query(db_path, "SELECT COUNT(*) FROM oauth_states") == [(0,)]
    assert (await storage.load("acct-1")) == account

    # Once the database takes writes again, the caller's retry of the same write succeeds:
    # no transaction was left open and the version was not consumed.
    await set_query_only(storage, False)
    saved = await save_refresh(
        storage, account, tokens("ACCESS-2", "REFRESH-2"), now=NOW, attempt=attempt
    )
    assert saved.version == 2
    assert row(db_path, "acct-1", "version") == (2,)
    assert (await storage.load("acct-1")).refresh_token == "REFRESH-2"
    assert [a.intuit_tid for a in attempts(db_path)] == ["tid-1"]
