"""Storage against real SQLite files and real AES-GCM keys: what only SQLite has.

Every check reads what an operator would read: the rows (with the sqlite3
module, not through Storage), the file's bytes and mode, the error message.
The behaviour both backends share is tested on both in test_shared.py.
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
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from qbo_daemon.core.errors import (
    DatabaseLockedError,
    StaleWriteError,
    StorageError,
)
from qbo_daemon.core.models import Account, AccountStatus, TokenSet
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.repository import (
    AccountWrite,
    Attempt,
    DatabaseLock,
    StateRecord,
    Storage,
)
from qbo_daemon.store.rows import REALM_DIGEST_PURPOSE
from qbo_daemon.store.schema import MIGRATIONS, SCHEMA_VERSION, sha256_hex
from qbo_daemon.store.states import answer_hash
from tests.harness import attempts
from tests.store.writes import (
    LEAD,
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


# -- what a refresh rewrites -----------------------------------------------------


SECRETS_AND_DIGEST = "realm_id, access_token, refresh_token, realm_digest, key_id"


async def test_a_refresh_rewrites_the_tokens_and_times_not_the_realm(
    storage: Storage, db_path: Path, cipher: Cipher
) -> None:
    """A refresh of a row as it was read sets only what moved: the realm's ciphertext and
    digest stay byte for byte (no new encryption, no index to update), and so does the
    refresh token's while Intuit has not rotated it."""
    await connect(storage)
    before = row(db_path, "acct-1", SECRETS_AND_DIGEST)
    account = await storage.load("acct-1")
    await save_refresh(storage, account, tokens("ACCESS-2", REFRESH, at=NOW + HOUR), now=NOW + HOUR)
    after = row(db_path, "acct-1", SECRETS_AND_DIGEST)
    assert after[0] == before[0]  # realm
    assert after[1] != before[1]  # the new access token
    assert after[2] == before[2]  # the same refresh token: not re-encrypted
    assert after[3:] == before[3:]  # digest and key
    reread = await storage.load("acct-1")
    assert (reread.realm_id, reread.access_token, reread.refresh_token) == (
        REALM,
        "ACCESS-2",
        REFRESH,
    )
    assert reread.token_expires_at == NOW + 2 * HOUR
    assert reread.version == account.version + 1

    # A rotated refresh token is encrypted anew.
    await save_refresh(storage, reread, tokens("ACCESS-3", "REFRESH-3", at=NOW), now=NOW)
    rotated = row(db_path, "acct-1", SECRETS_AND_DIGEST)
    assert rotated[2] != before[2]
    assert rotated[0] == before[0]
    assert (await storage.load("acct-1")).refresh_token == "REFRESH-3"


async def test_a_refresh_after_a_key_change_puts_every_secret_under_the_new_key(
    db_path: Path, key_a: EncryptionKey, key_b: EncryptionKey
) -> None:
    """Keys rotated between the read and the write: the write still leaves no secret of
    the row under the old key, so the old key can be dropped once rows are rewritten."""
    async with contextlib.AsyncExitStack() as stack:
        storage = await Storage.open(db_path, Cipher([key_a]))
        stack.push_async_callback(storage.close)
        await connect(storage)
        account = await storage.load("acct-1")
        storage.use_cipher(Cipher([key_b, key_a]))
        await save_refresh(storage, account, tokens("ACCESS-2", REFRESH), now=NOW)
    assert row(db_path, "acct-1", "key_id") == (key_b.key_id,)
    only_new = await Storage.open(db_path, Cipher([key_b]))
    try:
        reread = await only_new.load("acct-1")
    finally:
        await only_new.close()
    assert (reread.realm_id, reread.access_token, reread.refresh_token) == (
        REALM,
        "ACCESS-2",
        REFRESH,
    )


async def test_a_write_that_changes_the_realm_rewrites_its_digest(
    storage: Storage, db_path: Path, cipher: Cipher
) -> None:
    await connect(storage)
    account = await storage.load("acct-1")
    moved = replace(account, realm_id="REALM-other")
    await storage.commit(AccountWrite(moved, account.version, tokens=True))
    realm, digest = row(db_path, "acct-1", "realm_id, realm_digest")
    assert digest == cipher.digest("REALM-other", purpose=REALM_DIGEST_PURPOSE)
    assert cipher.decrypt(realm, table="accounts", column="realm_id", row_key="acct-1") == (
        "REALM-other"
    )


# -- group commit --------------------------------------------------------------


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
