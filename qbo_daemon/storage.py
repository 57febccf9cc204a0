"""SQLite storage: the only module that speaks SQL.

Two aiosqlite connections share the file in WAL mode: one writes, one reads, so
a read never sees another coroutine's uncommitted transaction. Every write
starts with ``BEGIN IMMEDIATE`` and commits under ``synchronous=FULL``: a token
write that returned is on disk. Token writes are compare-and-swap on
``version`` and go through a group-commit queue: refreshes finishing together
share one transaction and one fsync, and each caller returns only after that
commit (a stale write fails alone, the others commit).

Secrets (realm id, access and refresh token) are encrypted with associated
data naming the table, column and ``account_id``, so a ciphertext copied to
another row does not decrypt.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import aiosqlite

from qbo_daemon.crypto import Cipher
from qbo_daemon.errors import (
    AccountNotFoundError,
    DatabaseLockedError,
    MissingKeyError,
    OAuthStateError,
    StaleWriteError,
    StorageError,
)
from qbo_daemon.models import Account, AccountStatus, TokenSet, iso, parse_iso, reconnect_at
from qbo_daemon.schema import MIGRATIONS, SCHEMA_VERSION

_SECRET_COLUMNS = ("realm_id", "access_token", "refresh_token")
_ACCOUNT_COLUMNS = (
    "id, account_id, status, realm_id, access_token, refresh_token, key_id, token_expires_at, "
    "reconnect_token_at, refresh_token_expires_at, refresh_token_hard_expires_at, failure_count, "
    "last_error, last_refreshed_at, version, created_at, updated_at"
)
# How many attempt rows may be written between two trims of the attempts table.
_TRIM_EVERY = 1000


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    """What the scheduler needs of an account at start-up: times, no secrets."""

    account_id: str
    status: AccountStatus
    reconnect_token_at: datetime
    token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    refresh_token_hard_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One refresh attempt, for the append-only attempts table."""

    account_id: str
    started_at: datetime
    outcome: str
    duration_ms: float
    intuit_tid: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImportItem:
    """An existing connection brought in from elsewhere."""

    account_id: str
    realm_id: str
    refresh_token: str
    access_token: str | None = None
    token_expires_at: datetime | None = None
    refresh_token_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StateRecord:
    account_id: str
    outcome: str | None


@dataclass
class _Job:
    statements: list[tuple[str, tuple[Any, ...]]]
    cas: tuple[str, int] | None
    future: asyncio.Future[None]


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``: one daemon per database.

    The kernel drops the lock when the process dies, even by ``kill -9``.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + ".lock")
        self._file: TextIO | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DatabaseLockedError(str(self.database)) from None
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA busy_timeout = 5000")
        await conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is durable once it returns, even across power loss.
        await conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        # An unclosed aiosqlite connection keeps its worker thread (and the process) alive.
        await conn.close()
        raise
    return conn


class Storage:
    """Accounts, OAuth states and refresh attempts in one SQLite file."""

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        cipher: Cipher,
        *,
        attempts_keep: int,
    ) -> None:
        self.path = path
        self._db = writer
        self._reader = reader
        self.cipher = cipher
        self._attempts_keep = attempts_keep
        # Start due for a trim: the count is not persisted, and a daemon restarted before
        # every _TRIM_EVERY attempts would otherwise never trim the table.
        self._attempts_since_trim = _TRIM_EVERY
        self._tx_lock = asyncio.Lock()
        self._queue: list[_Job] = []
        self._queued = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(cls, path: Path, cipher: Cipher, *, attempts_keep: int = 100_000) -> Storage:
        """Open (creating or migrating) the database at ``path``."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Create a new database owner-only: SQLite gives the -wal and -shm files
            # the main file's mode, and a later chmod would not reach them.
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
            writer = await _connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        try:
            await _migrate(writer, path)
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        storage = cls(path, writer, reader, cipher, attempts_keep=attempts_keep)
        storage._writer_task = asyncio.create_task(storage._write_loop(), name="storage-writer")
        return storage

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        self._closing = True
        if self._writer_task is not None:
            self._queued.set()
            await self._writer_task
            self._writer_task = None
        async with self._tx_lock:  # let an open transaction finish first
            await self._reader.close()
            await self._db.close()

    # -- reading -----------------------------------------------------------

    async def get_account(self, account_id: str) -> Account:
        """The account with its secrets decrypted."""
        row = await self._fetchone(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?", (account_id,)
        )
        if row is None:
            raise AccountNotFoundError(account_id)
        return self._account(row, tokens=True)

    async def find_account(self, account_id: str) -> Account | None:
        try:
            return await self.get_account(account_id)
        except AccountNotFoundError:
            return None

    async def list_accounts(self) -> list[Account]:
        """Every account, ordered by ``account_id``; tokens are not decrypted (they are None)."""
        rows = await self._fetchall(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY account_id")
        return [self._account(row, tokens=False) for row in rows]

    async def schedule_entries(self) -> list[ScheduleEntry]:
        """Every account the scheduler should time: active or expired, with times."""
        rows = await self._fetchall(
            "SELECT account_id, status, reconnect_token_at, token_expires_at, "
            "refresh_token_expires_at, refresh_token_hard_expires_at FROM accounts "
            "WHERE status IN ('active', 'expired') AND refresh_token IS NOT NULL"
        )
        entries = []
        for row in rows:
            token_expires_at = parse_iso(row["token_expires_at"])
            due = parse_iso(row["reconnect_token_at"]) or token_expires_at
            if token_expires_at is None or due is None:
                continue
            entries.append(
                ScheduleEntry(
                    account_id=row["account_id"],
                    status=AccountStatus(row["status"]),
                    reconnect_token_at=due,
                    token_expires_at=token_expires_at,
                    refresh_token_expires_at=parse_iso(row["refresh_token_expires_at"]),
                    refresh_token_hard_expires_at=parse_iso(row["refresh_token_hard_expires_at"]),
                )
            )
        return entries

    async def status_counts(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, COUNT(*) AS n FROM accounts GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all."""
        where, params = ("WHERE account_id = ?", (account_id,)) if account_id else ("", ())
        rows = await self._fetchall(
            "SELECT account_id, started_at, outcome, duration_ms, intuit_tid, error "
            f"FROM refresh_attempts {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [
            Attempt(
                account_id=row["account_id"],
                started_at=parse_iso(row["started_at"]) or datetime.min,
                outcome=row["outcome"],
                duration_ms=row["duration_ms"],
                intuit_tid=row["intuit_tid"],
                error=row["error"],
            )
            for row in rows
        ]

    async def verify_keys(self) -> None:
        """Fail fast when a stored secret cannot be decrypted with the configured keys.

        Checks every key id in use is configured, and decrypts one row per key id.
        """
        rows = await self._fetchall(
            "SELECT key_id, MIN(account_id) AS sample FROM accounts "
            "WHERE key_id IS NOT NULL GROUP BY key_id"
        )
        for row in rows:
            if row["key_id"] not in self.cipher.key_ids:
                raise MissingKeyError(row["key_id"])
            await self.get_account(row["sample"])

    async def ping(self) -> None:
        await self._fetchone("SELECT 1", ())

    # -- token writes --------------------------------------------------------

    async def save_connection(
        self, account_id: str, realm_id: str, tokens: TokenSet, *, lead: timedelta, now: datetime
    ) -> Account:
        """Store a new connection, or replace the tokens of an existing account (reconnect)."""
        async with self._transaction():
            return await self._upsert(account_id, realm_id, tokens, lead=lead, now=now)

    async def import_accounts(
        self, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
    ) -> list[Account]:
        """Store every item in one transaction: all or nothing.

        An access token without a known future expiry is treated as dead, so the
        account is due for a refresh at once.
        """
        async with self._transaction():
            stored = []
            for item in items:
                expires = item.token_expires_at
                access = item.access_token
                if access is None or expires is None or expires <= now:
                    access, expires = "", now
                tokens = TokenSet(
                    access_token=access,
                    refresh_token=item.refresh_token,
                    obtained_at=now,
                    token_expires_at=expires,
                    refresh_token_expires_at=item.refresh_token_expires_at
                    or now + timedelta(days=100),
                )
                stored.append(
                    await self._upsert(item.account_id, item.realm_id, tokens, lead=lead, now=now)
                )
            return stored

    async def save_refresh(
        self,
        account: Account,
        tokens: TokenSet,
        *,
        lead: timedelta,
        now: datetime,
        attempt: Attempt | None = None,
    ) -> Account:
        """Persist a refresh's tokens and times if the row is still at ``account.version``.

        Durable when this returns; raises :class:`StaleWriteError` when the row
        changed meanwhile.
        """
        key_id = self.cipher.primary_key_id
        due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
        hard = tokens.refresh_token_hard_expires_at or account.refresh_token_hard_expires_at
        updated = replace(
            account,
            status=AccountStatus.ACTIVE,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=tokens.token_expires_at,
            reconnect_token_at=due,
            refresh_token_expires_at=tokens.refresh_token_expires_at,
            refresh_token_hard_expires_at=hard,
            failure_count=0,
            last_error=None,
            last_refreshed_at=now,
            version=account.version + 1,
            updated_at=now,
        )
        enc = self._encrypt_row(updated)
        statements = [
            (
                "UPDATE accounts SET status = ?, realm_id = ?, access_token = ?, "
                "refresh_token = ?, key_id = ?, token_expires_at = ?, reconnect_token_at = ?, "
                "refresh_token_expires_at = ?, refresh_token_hard_expires_at = ?, "
                "failure_count = 0, last_error = NULL, last_refreshed_at = ?, "
                "version = version + 1, updated_at = ? WHERE account_id = ? AND version = ?",
                (
                    updated.status.value,
                    enc["realm_id"],
                    enc["access_token"],
                    enc["refresh_token"],
                    key_id,
                    iso(updated.token_expires_at),
                    iso(due),
                    iso(updated.refresh_token_expires_at),
                    iso(hard),
                    iso(now),
                    iso(now),
                    account.account_id,
                    account.version,
                ),
            )
        ]
        statements.extend(self._attempt_statements(attempt))
        await self._enqueue(statements, cas=(account.account_id, account.version))
        return updated

    async def record_failure(
        self,
        account: Account,
        *,
        status: AccountStatus,
        error: str,
        now: datetime,
        attempt: Attempt | None = None,
    ) -> Account:
        """Note a failed refresh (and the status it leaves) if the row is still at its version."""
        updated = replace(
            account,
            status=status,
            failure_count=account.failure_count + 1,
            last_error=error,
            version=account.version + 1,
            updated_at=now,
        )
        statements = [
            (
                "UPDATE accounts SET status = ?, failure_count = failure_count + 1, "
                "last_error = ?, version = version + 1, updated_at = ? "
                "WHERE account_id = ? AND version = ?",
                (status.value, error, iso(now), account.account_id, account.version),
            )
        ]
        statements.extend(self._attempt_statements(attempt))
        await self._enqueue(statements, cas=(account.account_id, account.version))
        return updated

    async def record_attempt(self, attempt: Attempt) -> None:
        """Record an attempt that changes no account (for example ``invalid_client``)."""
        await self._enqueue(self._attempt_statements(attempt), cas=None)

    async def forget_tokens(self, account: Account, *, now: datetime) -> Account:
        """Disconnect: drop every token, keep a tombstone row marked ``disconnected``."""
        updated = replace(
            account,
            status=AccountStatus.DISCONNECTED,
            access_token=None,
            refresh_token=None,
            reconnect_token_at=None,
            version=account.version + 1,
            updated_at=now,
        )
        await self._enqueue(
            [
                (
                    "UPDATE accounts SET status = 'disconnected', access_token = NULL, "
                    "refresh_token = NULL, reconnect_token_at = NULL, version = version + 1, "
                    "updated_at = ? WHERE account_id = ? AND version = ?",
                    (iso(now), account.account_id, account.version),
                )
            ],
            cas=(account.account_id, account.version),
        )
        return updated

    async def reencrypt(self, *, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows not yet under the primary key.

        Returns (rows re-encrypted now, rows still to do). Each row is a
        compare-and-swap: a row a refresh rewrote meanwhile is simply left for
        the next call (the refresh already wrote it under the primary key).
        """
        primary = self.cipher.primary_key_id
        rows = await self._fetchall(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE key_id IS NOT NULL AND key_id != ? "
            "LIMIT ?",
            (primary, batch),
        )
        done = 0
        for row in rows:
            account = self._account(row, tokens=True)
            enc = self._encrypt_row(account)
            try:
                await self._enqueue(
                    [
                        (
                            "UPDATE accounts SET realm_id = ?, access_token = ?, "
                            "refresh_token = ?, key_id = ?, version = version + 1 "
                            "WHERE account_id = ? AND version = ?",
                            (
                                enc["realm_id"],
                                enc["access_token"],
                                enc["refresh_token"],
                                primary,
                                account.account_id,
                                account.version,
                            ),
                        )
                    ],
                    cas=(account.account_id, account.version),
                )
                done += 1
            except StaleWriteError:
                continue
        remaining = await self._fetchone(
            "SELECT COUNT(*) AS n FROM accounts WHERE key_id IS NOT NULL AND key_id != ?",
            (primary,),
        )
        return done, int(remaining["n"]) if remaining else 0

    # -- OAuth states --------------------------------------------------------

    async def create_state(
        self, state: str, account_id: str, *, now: datetime, ttl: timedelta
    ) -> None:
        async with self._transaction():
            # Forget states long past their expiry so the table stays small.
            await self._db.execute(
                "DELETE FROM oauth_states WHERE expires_at < ?", (iso(now - timedelta(days=1)),)
            )
            await self._db.execute(
                "INSERT INTO oauth_states (state, account_id, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (state, account_id, iso(now), iso(now + ttl)),
            )

    async def consume_state(self, state: str, *, now: datetime) -> str:
        """Mark ``state`` used and return the account it was issued for.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired`` or
        ``used``; a failed check changes nothing.
        """
        async with self._transaction():
            cursor = await self._db.execute(
                "SELECT account_id, expires_at, used_at FROM oauth_states WHERE state = ?",
                (state,),
            )
            row = await cursor.fetchone()
            if row is None:
                raise OAuthStateError(
                    "unknown", "This sign-in link is not known. Start connecting again."
                )
            if row["used_at"] is not None:
                raise OAuthStateError("used", "This sign-in link has already been used.")
            expires_at = parse_iso(row["expires_at"])
            if expires_at is None or expires_at <= now:
                raise OAuthStateError(
                    "expired", "This sign-in link has expired. Start connecting again."
                )
            await self._db.execute(
                "UPDATE oauth_states SET used_at = ? WHERE state = ?", (iso(now), state)
            )
            return str(row["account_id"])

    async def finish_state(self, state: str, outcome: str) -> None:
        async with self._transaction():
            await self._db.execute(
                "UPDATE oauth_states SET outcome = ? WHERE state = ?", (outcome, state)
            )

    async def get_state(self, state: str) -> StateRecord | None:
        row = await self._fetchone(
            "SELECT account_id, outcome FROM oauth_states WHERE state = ?", (state,)
        )
        if row is None:
            return None
        return StateRecord(account_id=row["account_id"], outcome=row["outcome"])

    # -- internals -----------------------------------------------------------

    async def _upsert(
        self, account_id: str, realm_id: str, tokens: TokenSet, *, lead: timedelta, now: datetime
    ) -> Account:
        cursor = await self._db.execute(
            "SELECT id, version, created_at FROM accounts WHERE account_id = ?", (account_id,)
        )
        existing = await cursor.fetchone()
        due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
        account = Account(
            id=existing["id"] if existing else 0,
            account_id=account_id,
            status=AccountStatus.ACTIVE,
            realm_id=realm_id,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=tokens.token_expires_at,
            reconnect_token_at=due,
            refresh_token_expires_at=tokens.refresh_token_expires_at,
            refresh_token_hard_expires_at=tokens.refresh_token_hard_expires_at,
            failure_count=0,
            last_error=None,
            last_refreshed_at=now,
            version=existing["version"] + 1 if existing else 1,
            created_at=parse_iso(existing["created_at"]) or now if existing else now,
            updated_at=now,
        )
        enc = self._encrypt_row(account)
        values = (
            account.status.value,
            enc["realm_id"],
            enc["access_token"],
            enc["refresh_token"],
            self.cipher.primary_key_id,
            iso(account.token_expires_at),
            iso(due),
            iso(account.refresh_token_expires_at),
            iso(account.refresh_token_hard_expires_at),
            iso(now),
            iso(now),
        )
        if existing:
            await self._db.execute(
                "UPDATE accounts SET status = ?, realm_id = ?, access_token = ?, "
                "refresh_token = ?, key_id = ?, token_expires_at = ?, reconnect_token_at = ?, "
                "refresh_token_expires_at = ?, refresh_token_hard_expires_at = ?, "
                "last_refreshed_at = ?, updated_at = ?, failure_count = 0, last_error = NULL, "
                "version = version + 1 WHERE account_id = ?",
                (*values, account_id),
            )
            return account
        cursor = await self._db.execute(
            "INSERT INTO accounts (status, realm_id, access_token, refresh_token, key_id, "
            "token_expires_at, reconnect_token_at, refresh_token_expires_at, "
            "refresh_token_hard_expires_at, last_refreshed_at, updated_at, account_id, "
            "created_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
            (*values, account_id, iso(now)),
        )
        return replace(account, id=cursor.lastrowid or 0)

    def _encrypt_row(self, account: Account) -> dict[str, str | None]:
        values = {
            "realm_id": account.realm_id,
            "access_token": account.access_token,
            "refresh_token": account.refresh_token,
        }
        return {
            column: None
            if value is None
            else self.cipher.encrypt(
                value, table="accounts", column=column, row_key=account.account_id
            )
            for column, value in values.items()
        }

    def _decrypt(self, row: sqlite3.Row, column: str) -> str | None:
        value = row[column]
        if value is None:
            return None
        return self.cipher.decrypt(
            value, table="accounts", column=column, row_key=row["account_id"]
        )

    def _account(self, row: sqlite3.Row, *, tokens: bool) -> Account:
        return Account(
            id=row["id"],
            account_id=row["account_id"],
            status=AccountStatus(row["status"]),
            realm_id=self._decrypt(row, "realm_id"),
            access_token=self._decrypt(row, "access_token") if tokens else None,
            refresh_token=self._decrypt(row, "refresh_token") if tokens else None,
            token_expires_at=parse_iso(row["token_expires_at"]),
            reconnect_token_at=parse_iso(row["reconnect_token_at"]),
            refresh_token_expires_at=parse_iso(row["refresh_token_expires_at"]),
            refresh_token_hard_expires_at=parse_iso(row["refresh_token_hard_expires_at"]),
            failure_count=row["failure_count"],
            last_error=row["last_error"],
            last_refreshed_at=parse_iso(row["last_refreshed_at"]),
            version=row["version"],
            created_at=parse_iso(row["created_at"]) or datetime.min,
            updated_at=parse_iso(row["updated_at"]) or datetime.min,
        )

    def _attempt_statements(self, attempt: Attempt | None) -> list[tuple[str, tuple[Any, ...]]]:
        if attempt is None:
            return []
        return [
            (
                "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms, "
                "intuit_tid, error) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    attempt.account_id,
                    iso(attempt.started_at),
                    attempt.outcome,
                    round(attempt.duration_ms, 3),
                    attempt.intuit_tid,
                    attempt.error,
                ),
            )
        ]

    async def _fetchone(self, sql: str, params: Iterable[Any]) -> sqlite3.Row | None:
        try:
            cursor = await self._reader.execute(sql, tuple(params))
            row = await cursor.fetchone()
            await cursor.close()
        except sqlite3.Error as exc:
            raise StorageError(f"database read failed: {exc}") from exc
        return row

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            cursor = await self._reader.execute(sql, tuple(params))
            rows = await cursor.fetchall()
            await cursor.close()
        except sqlite3.Error as exc:
            raise StorageError(f"database read failed: {exc}") from exc
        return list(rows)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._tx_lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"database write failed: {exc}") from exc
            try:
                yield
                await self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"database write failed: {exc}") from exc
                raise

    async def _enqueue(
        self, statements: list[tuple[str, tuple[Any, ...]]], *, cas: tuple[str, int] | None
    ) -> None:
        if self._closing or self._writer_task is None or self._writer_task.done():
            raise StorageError("storage is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller cancelled meanwhile never reads its outcome; read it here so
        # asyncio does not report an exception "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(_Job(statements, cas, future))
        self._queued.set()
        # Shielded: a caller cancelled at shutdown must not leave its write half-known;
        # the write still commits with its batch.
        await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            jobs, self._queue = self._queue, []
            if jobs:
                async with self._tx_lock:
                    await self._commit_batch(jobs)
            if self._closing and not self._queue:
                return

    async def _commit_batch(self, jobs: list[_Job]) -> None:
        """Run many callers' writes in one transaction and one fsync."""
        stale: set[int] = set()
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            attempts = 0
            for index, job in enumerate(jobs):
                for position, (sql, params) in enumerate(job.statements):
                    cursor = await self._db.execute(sql, params)
                    if position == 0 and job.cas is not None and cursor.rowcount != 1:
                        stale.add(index)
                        break
                    if sql.startswith("INSERT INTO refresh_attempts"):
                        attempts += 1
            self._attempts_since_trim += attempts
            if self._attempts_since_trim >= _TRIM_EVERY:
                await self._db.execute(
                    "DELETE FROM refresh_attempts WHERE id <= "
                    "(SELECT MAX(id) FROM refresh_attempts) - ?",
                    (self._attempts_keep,),
                )
                self._attempts_since_trim = 0
            await self._db.execute("COMMIT")
        except Exception as exc:  # the writer must outlive any failure, or callers hang
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("ROLLBACK")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(StorageError(f"database write failed: {exc}"))
            return
        for index, job in enumerate(jobs):
            if job.future.done():
                continue
            if index in stale and job.cas is not None:
                job.future.set_exception(StaleWriteError(*job.cas))
            else:
                job.future.set_result(None)


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    cursor = await conn.execute("PRAGMA user_version")
    row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database {path} has schema version {version}, newer than this qbo-daemon "
            f"understands ({SCHEMA_VERSION}); upgrade qbo-daemon"
        )
    for number in range(version + 1, SCHEMA_VERSION + 1):
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[number - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
            await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise StorageError(
                f"migrating database {path} to version {number} failed: {exc}"
            ) from exc
    # The database holds encrypted secrets and realm ids: keep it private.
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
