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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TextIO, TypeVar

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
_ATTEMPT_INSERT = "INSERT INTO refresh_attempts"
# Account ids per query when concurrent reads are served together.
_READ_BATCH = 500
# Rows per query when the scheduler loads every account at start-up.
_SCHEDULE_CHUNK = 5000


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
        # Account reads waiting to share one query (see _read_wanted_rows).
        self._wanted: dict[str, list[asyncio.Future[sqlite3.Row | None]]] = {}
        self._read_task: asyncio.Task[None] | None = None

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
        future: asyncio.Future[sqlite3.Row | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(account_id, []).append(future)
        if self._read_task is None:
            self._read_task = asyncio.create_task(self._read_wanted_rows(), name="storage-reader")
        row = await future
        if row is None:
            raise AccountNotFoundError(account_id)
        return self._account(row, tokens=True)

    async def _read_wanted_rows(self) -> None:
        """Read every account row asked for, many per query, until no one waits.

        In a storm dozens of refreshes read their row at once: one query and one
        round trip to the reader thread serve all of them, where one each would
        queue behind each other and wait a turn of the busy event loop apiece.
        Every read still sees what was committed when it was asked for, or later.
        """
        wanted: dict[str, list[asyncio.Future[sqlite3.Row | None]]] = {}
        try:
            while self._wanted:
                wanted, self._wanted = self._wanted, {}
                ids = list(wanted)
                try:
                    rows: list[sqlite3.Row] = []
                    for start in range(0, len(ids), _READ_BATCH):
                        chunk = ids[start : start + _READ_BATCH]
                        rows += await self._fetchall(
                            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts "
                            f"WHERE account_id IN ({', '.join('?' * len(chunk))})",
                            chunk,
                        )
                except Exception as exc:  # each asker gets the failure as its own read would
                    for futures in wanted.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                found = {row["account_id"]: row for row in rows}
                for account_id, futures in wanted.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(account_id))
        finally:
            self._read_task = None
            for futures in (*wanted.values(), *self._wanted.values()):
                for future in futures:
                    future.cancel()  # a no-op for the answered ones

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
        """Every account the scheduler should time: active or expired, with times.

        Read a chunk of rows at a time: with 100,000 accounts, all the rows at once
        would hold ~55 MB of row objects beside the entries made from them.
        """
        entries = []
        last_id = 0
        while True:
            # "+status": walk the primary key from last_id; the status index would make
            # every chunk scan and sort all the rows after it.
            rows = await self._fetchall(
                "SELECT id, account_id, status, reconnect_token_at, token_expires_at, "
                "refresh_token_expires_at, refresh_token_hard_expires_at FROM accounts "
                "WHERE +status IN ('active', 'expired') AND refresh_token IS NOT NULL "
                "AND id > ? ORDER BY id LIMIT ?",
                (last_id, _SCHEDULE_CHUNK),
            )
            entries.extend(_schedule_entries(rows))
            if len(rows) < _SCHEDULE_CHUNK:
                return entries
            last_id = rows[-1]["id"]

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

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Fail fast when a stored secret cannot be decrypted with the configured keys.

        Checks every key id in use is configured, and decrypts one row per key id.
        With ``cipher`` (a reload's new keys, not yet in use) only the key ids are
        checked: an id is derived from its key, so a known id is the same key.
        """
        rows = await self._fetchall(
            "SELECT key_id, MIN(account_id) AS sample FROM accounts "
            "WHERE key_id IS NOT NULL GROUP BY key_id"
        )
        for row in rows:
            if row["key_id"] not in (cipher or self.cipher).key_ids:
                raise MissingKeyError(row["key_id"])
            if cipher is None:
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
                tokens = _imported_tokens(item, now)
                stored.append(
                    await self._upsert(item.account_id, item.realm_id, tokens, lead=lead, now=now)
                )
            return stored

    async def insert_accounts(
        self, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
    ) -> int:
        """Store new accounts in one transaction and one statement: all or nothing.

        The bulk path (the benchmark loads 100,000 accounts through it): the same
        rows as :meth:`import_accounts`, without its round trip per row, but an
        existing ``account_id`` fails the whole batch instead of being replaced.
        Returns how many accounts were stored.
        """
        key_id = self.cipher.primary_key_id
        rows = []
        for item in items:
            tokens = _imported_tokens(item, now)
            secrets = {
                "realm_id": item.realm_id,
                "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token,
            }
            enc = {
                column: self.cipher.encrypt(
                    value, table="accounts", column=column, row_key=item.account_id
                )
                for column, value in secrets.items()
            }
            due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
            rows.append(
                (
                    AccountStatus.ACTIVE.value,
                    enc["realm_id"],
                    enc["access_token"],
                    enc["refresh_token"],
                    key_id,
                    iso(tokens.token_expires_at),
                    iso(due),
                    iso(tokens.refresh_token_expires_at),
                    iso(now),
                    iso(now),
                    item.account_id,
                    iso(now),
                )
            )
        async with self._transaction():
            await self._db.executemany(
                "INSERT INTO accounts (status, realm_id, access_token, refresh_token, key_id, "
                "token_expires_at, reconnect_token_at, refresh_token_expires_at, "
                "last_refreshed_at, updated_at, account_id, created_at, version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                rows,
            )
        return len(rows)

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
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # One round trip to the reader thread (execute, fetch and close would be three,
        # each waiting for a turn of a busy event loop).
        try:
            rows = await self._reader.execute_fetchall(sql, tuple(params))
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
        batch = [(job.statements, job.cas[0] if job.cas else None) for job in jobs]
        try:
            stale, attempts, trimmed = await _on_writer_thread(
                self._db,
                partial(
                    _write_batch,
                    jobs=batch,
                    trim_after=_TRIM_EVERY - self._attempts_since_trim,
                    keep=self._attempts_keep,
                ),
            )
        except Exception as exc:  # the writer must outlive any failure, or callers hang
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(StorageError(f"database write failed: {exc}"))
            return
        self._attempts_since_trim = 0 if trimmed else self._attempts_since_trim + attempts
        for index, job in enumerate(jobs):
            if job.future.done():
                continue
            if index in stale and job.cas is not None:
                job.future.set_exception(StaleWriteError(*job.cas))
            else:
                job.future.set_result(None)


# A queued job as the writer thread sees it: its statements, and the account of its
# compare-and-swap (the first statement) or None.
_Batched = tuple[list[tuple[str, tuple[Any, ...]]], str | None]
_T = TypeVar("_T")


async def _on_writer_thread(
    conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], _T]
) -> _T:
    """Run ``fn`` with ``conn``'s sqlite3 connection on its own thread: one round trip.

    A group commit as separate ``execute`` calls costs a round trip per statement,
    and each waits for a turn of the busy event loop (milliseconds in a storm).
    aiosqlite has no public call for this; ``_execute`` and ``_conn`` are what its
    own cursors use.
    """
    result: _T = await conn._execute(fn, conn._conn)  # type: ignore[no-untyped-call]
    return result


def _write_batch(
    db: sqlite3.Connection, *, jobs: list[_Batched], trim_after: int, keep: int
) -> tuple[set[int], int, bool]:
    """The group commit's transaction, on the writer thread.

    ``jobs`` holds each job's statements and, when the first is a
    compare-and-swap, the account it is on. Returns the indexes of the stale jobs, the attempts
    written, and whether the attempts table was trimmed (once ``trim_after``
    attempts are written).
    """
    stale: set[int] = set()
    db.execute("BEGIN IMMEDIATE")
    try:
        attempts = _run_grouped(db, jobs)
        if attempts is None:
            db.execute("ROLLBACK")
            db.execute("BEGIN IMMEDIATE")
            attempts = _run_one_by_one(db, jobs, stale)
        trimmed = attempts >= trim_after
        if trimmed:
            db.execute(
                "DELETE FROM refresh_attempts WHERE id <= "
                "(SELECT MAX(id) FROM refresh_attempts) - ?",
                (keep,),
            )
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return stale, attempts, trimmed


def _run_grouped(db: sqlite3.Connection, jobs: list[_Batched]) -> int | None:
    """Run the batch as one ``executemany`` per distinct statement; the attempts written.

    Taken only when it cannot change the outcome: every compare-and-swap is on a
    different account and everything else only appends attempts (in job order),
    so the grouped statements write what job-by-job ones would. Returns None when
    that does not hold (nothing run), or when a compare-and-swap failed (the
    caller rolls back and runs job by job, so the stale write fails alone).
    """
    keys = [account_id for _, account_id in jobs if account_id is not None]
    if len(set(keys)) != len(keys):
        return None
    groups: dict[tuple[str, bool], list[tuple[Any, ...]]] = {}
    for statements, account_id in jobs:
        for position, (sql, params) in enumerate(statements):
            cas = account_id is not None and position == 0
            if not cas and not sql.startswith(_ATTEMPT_INSERT):
                return None
            groups.setdefault((sql, cas), []).append(params)
    for (sql, cas), rows in groups.items():
        cursor = db.executemany(sql, rows)
        if cas and cursor.rowcount != len(rows):
            return None
    return sum(len(rows) for (_, cas), rows in groups.items() if not cas)


def _run_one_by_one(db: sqlite3.Connection, jobs: list[_Batched], stale: set[int]) -> int:
    """Run each job's statements in turn; a failed compare-and-swap skips its job."""
    attempts = 0
    for index, (statements, account_id) in enumerate(jobs):
        for position, (sql, params) in enumerate(statements):
            cursor = db.execute(sql, params)
            if position == 0 and account_id is not None and cursor.rowcount != 1:
                stale.add(index)
                break
            if sql.startswith(_ATTEMPT_INSERT):
                attempts += 1
    return attempts


def _schedule_entries(rows: Iterable[sqlite3.Row]) -> list[ScheduleEntry]:
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


def _imported_tokens(item: ImportItem, now: datetime) -> TokenSet:
    """An imported connection's tokens; an access token without a future expiry is dead."""
    expires = item.token_expires_at
    access = item.access_token
    if access is None or expires is None or expires <= now:
        access, expires = "", now
    return TokenSet(
        access_token=access,
        refresh_token=item.refresh_token,
        obtained_at=now,
        token_expires_at=expires,
        refresh_token_expires_at=item.refresh_token_expires_at or now + timedelta(days=100),
    )


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
