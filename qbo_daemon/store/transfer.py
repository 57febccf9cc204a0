"""Copying an installation from one storage to another (SQLite ⇄ PostgreSQL), verified.

The rows travel as they are stored: the secrets stay the same ciphertext
(both storages encrypt with the same associated data), ids and versions are
kept, so nothing is decrypted and re-encrypted on the way (the realm digests
and the states' verifiers neither: they are keyed and bound the same way on
both). Accounts, OAuth states (as their hashes) and refresh attempts are
copied; the ``nodes`` heartbeats are not (they describe running daemons, and
none may run).

Every daemon must be stopped: an SQLite side is held under the lock a daemon
takes, and a PostgreSQL side is refused while a qbo-daemon session is
connected to it. The target must hold no row. The copy is one transaction on
the target (all or nothing), then verified: the same number of rows in each
table, the same rows (a digest of each table on both sides), and every
stored secret of every account decrypts with the configured keys.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from qbo_daemon.core.dburl import is_postgres_url, postgres_url_problem
from qbo_daemon.core.errors import (
    DatabaseLockedError,
    MissingKeyError,
    QboDaemonError,
    StorageError,
)
from qbo_daemon.core.models import iso, parse_iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.lock import DatabaseLock
from qbo_daemon.store.postgres.database import DAEMON_APPLICATION, Conn, PgDatabase, PgSettings
from qbo_daemon.store.rows import ACCOUNT_COLUMNS
from qbo_daemon.store.sqlite import Database

# Rows per read and per write.
CHUNK = 5000
_SECRETS = ("realm_id", "access_token", "refresh_token")

Row = tuple[Any, ...]  # a table's columns in order; times as aware UTC datetimes


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    key: str  # copied and compared in this column's order
    columns: tuple[str, ...]
    # Booleans: INTEGER 0/1 on SQLite, boolean on PostgreSQL; Python bools in between.
    booleans: tuple[str, ...] = ()

    @property
    def key_start(self) -> int | str:
        return 0 if self.key == "id" else ""


TABLES = (
    # The same columns every other reader of accounts uses (store/rows.py).
    Table("accounts", "id", ACCOUNT_COLUMNS, booleans=("realm_verified",)),
    # PostgreSQL's ``seq`` (SQLite's rowid) is not copied: each side numbers the rows in
    # the order they arrive, by state_hash.
    Table(
        "oauth_states",
        "state_hash",
        (
            "state_hash",
            "account_id",
            "created_at",
            "expires_at",
            "used_at",
            "outcome",
            "answer_hash",
            "code_verifier",
            "allow_realm_change",
        ),
        booleans=("allow_realm_change",),
    ),
    Table(
        "refresh_attempts",
        "id",
        ("id", "account_id", "started_at", "outcome", "duration_ms", "intuit_tid", "error"),
    ),
)
ACCOUNTS = TABLES[0]


@dataclass(frozen=True, slots=True)
class Summary:
    """What was copied where; shows no secret (the URLs are redacted)."""

    source: str
    target: str
    counts: dict[str, int]  # rows per table, as copied and as verified
    key_ids: tuple[str, ...]  # the keys the copied secrets are under


class Side(ABC):
    """One storage as the copy sees it: tables of rows, read in key order or filled at once."""

    where: str  # the path, or the URL with its password masked

    @abstractmethod
    async def count(self, table: Table) -> int: ...

    @abstractmethod
    def chunks(self, table: Table) -> AsyncIterator[list[Row]]:
        """The table's rows in key order, :data:`CHUNK` at a time."""

    @abstractmethod
    async def fill(self, source: Side) -> None:
        """Insert every row of ``source`` in one transaction."""

    @abstractmethod
    async def close(self) -> None: ...

    async def key_ids(self) -> set[str]:
        found: set[str] = set()
        async for chunk in self.chunks(ACCOUNTS):
            found.update(row[ACCOUNTS.columns.index("key_id")] for row in chunk)
        return found - {None}

    async def digest(self, table: Table) -> str:
        """A digest of every row, in key order: equal on both sides when the rows are."""
        digest = hashlib.sha256()
        async for chunk in self.chunks(table):
            for row in chunk:
                digest.update(repr(row).encode())
        return digest.hexdigest()


class SqliteSide(Side):
    """An SQLite file, held under the daemon's lock while open."""

    def __init__(self, path: Path, database: Database, lock: DatabaseLock) -> None:
        self.where = str(path)
        self._db = database
        self._lock = lock

    @classmethod
    async def open(cls, path: Path, *, must_exist: bool) -> SqliteSide:
        if must_exist and not await asyncio.to_thread(path.exists):
            raise StorageError(f"no database at {path}")
        lock = DatabaseLock(path)
        try:
            lock.acquire()
        except DatabaseLockedError:
            raise StorageError(
                f"a qbo-daemon is running on {path}: stop it before migrating"
            ) from None
        try:
            return cls(path, await Database.open(path, attempts_keep=2**62), lock)
        except BaseException:
            lock.release()
            raise

    async def close(self) -> None:
        try:
            await self._db.close()
        finally:
            self._lock.release()

    async def count(self, table: Table) -> int:
        row = await self._db.fetchone(f"SELECT COUNT(*) AS n FROM {table.name}", ())
        return int(row["n"]) if row else 0

    async def chunks(self, table: Table) -> AsyncIterator[list[Row]]:
        last: int | str = table.key_start
        while True:
            rows = await self._db.fetchall(
                f"SELECT {', '.join(table.columns)} FROM {table.name} "
                f"WHERE {table.key} > ? ORDER BY {table.key} LIMIT ?",
                (last, CHUNK),
            )
            if not rows:
                return
            yield [_from_sqlite(table, tuple(row)) for row in rows]
            last = rows[-1][table.key]

    async def fill(self, source: Side) -> None:
        async with self._db.transaction() as conn:
            for table in TABLES:
                await _fill_sqlite(conn, table, source)


class PostgresSide(Side):
    """A PostgreSQL database; refused while a daemon is connected to it."""

    def __init__(self, database: PgDatabase) -> None:
        self.where = database.where
        self._db = database

    @classmethod
    async def open(cls, url: str) -> PostgresSide:
        problem = postgres_url_problem(url)
        if problem is not None:
            raise StorageError(f"not a PostgreSQL URL: {problem}")
        settings = PgSettings(min_size=1, max_size=2, application_name="qbo-daemon migrate")
        side = cls(await PgDatabase.open(url, settings))
        try:
            daemons = await side._db.fetchrow(
                "SELECT count(*) AS n FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = $1",
                DAEMON_APPLICATION,
            )
            if daemons and daemons["n"]:
                raise StorageError(
                    f"{daemons['n']} qbo-daemon connection(s) to {side.where}: "
                    "stop every daemon before migrating"
                )
        except BaseException:
            await side.close()
            raise
        return side

    async def close(self) -> None:
        await self._db.close()

    async def count(self, table: Table) -> int:
        row = await self._db.fetchrow(f"SELECT count(*) AS n FROM {table.name}")
        return int(row["n"]) if row else 0

    async def chunks(self, table: Table) -> AsyncIterator[list[Row]]:
        last: int | str = table.key_start
        while True:
            records = await self._db.fetch(
                f"SELECT {', '.join(table.columns)} FROM {table.name} "
                f"WHERE {table.key} > $1 ORDER BY {table.key} LIMIT $2",
                last,
                CHUNK,
            )
            if not records:
                return
            yield [tuple(record.values()) for record in records]
            last = records[-1][table.key]

    async def fill(self, source: Side) -> None:
        async def work(conn: Conn) -> None:
            for table in TABLES:
                async for chunk in source.chunks(table):
                    await conn.copy_records_to_table(
                        table.name, records=chunk, columns=table.columns
                    )
                if table.key == "id":  # new rows go on after the copied ids
                    await conn.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                        f"COALESCE(max(id), 0) + 1, false) FROM {table.name}"
                    )

        await self._db.write(work)


async def open_side(where: str, *, source: bool) -> Side:
    """The storage at ``where``: a ``postgresql://`` URL, else an SQLite file path."""
    if is_postgres_url(where):
        return await PostgresSide.open(where)
    return await SqliteSide.open(Path(where), must_exist=source)


async def migrate_storage(
    source: str, target: str, cipher: Cipher, *, progress: Callable[[str], None]
) -> Summary:
    """Copy every row of ``source`` into the empty ``target``, then verify; see the module."""
    if source == target:
        raise QboDaemonError("--from and --to name the same storage")
    src = await open_side(source, source=True)
    try:
        dst = await open_side(target, source=False)
        try:
            return await _copy(src, dst, cipher, progress)
        finally:
            await dst.close()
    finally:
        await src.close()


async def _copy(
    source: Side, target: Side, cipher: Cipher, progress: Callable[[str], None]
) -> Summary:
    held = {table.name: await target.count(table) for table in TABLES}
    if any(held.values()):
        rows = ", ".join(f"{n} {name}" for name, n in held.items() if n)
        raise StorageError(f"the target {target.where} is not empty ({rows}); nothing copied")
    key_ids = await source.key_ids()
    for key_id in sorted(key_ids):
        if key_id not in cipher.key_ids:
            raise MissingKeyError(key_id)
    # Before anything is written: a secret that does not decrypt here would not there either.
    await _decrypt_every_account(source, cipher)
    counts = {table.name: await source.count(table) for table in TABLES}
    progress(f"copying {_listing(counts)} from {source.where} to {target.where}")
    await target.fill(source)

    progress("verifying")
    try:
        await _verify(source, target, counts, cipher)
    except QboDaemonError as exc:
        raise StorageError(
            f"verification failed: {exc}; {target.where} holds the copy: empty it before "
            "trying again"
        ) from None
    return Summary(source.where, target.where, counts, tuple(sorted(key_ids)))


async def _verify(source: Side, target: Side, counts: dict[str, int], cipher: Cipher) -> None:
    for table in TABLES:
        copied = await target.count(table)
        if copied != counts[table.name]:
            raise StorageError(
                f"{table.name} has {copied} rows in {target.where}, "
                f"{counts[table.name]} in {source.where}"
            )
        if await target.digest(table) != await source.digest(table):
            raise StorageError(f"the rows of {table.name} differ between the two")
    await _decrypt_every_account(target, cipher)


async def _decrypt_every_account(side: Side, cipher: Cipher) -> None:
    """Decrypt each stored secret of each account, as the daemon would read it."""
    columns = ACCOUNTS.columns
    account_id = columns.index("account_id")
    async for chunk in side.chunks(ACCOUNTS):
        for row in chunk:
            for column in _SECRETS:
                value = row[columns.index(column)]
                if value is not None:
                    cipher.decrypt(value, table="accounts", column=column, row_key=row[account_id])


def _listing(counts: dict[str, int]) -> str:
    names = {"accounts": "accounts", "oauth_states": "OAuth states", "refresh_attempts": "attempts"}
    return ", ".join(f"{counts[table]:,} {name}" for table, name in names.items())


def _from_sqlite(table: Table, row: Row) -> Row:
    return tuple(
        parse_iso(value)
        if column.endswith("_at")
        else bool(value)
        if column in table.booleans and value is not None
        else value
        for column, value in zip(table.columns, row, strict=True)
    )


def _to_sqlite(table: Table, row: Row) -> Row:
    return tuple(
        iso(value)
        if isinstance(value, datetime)
        else int(value)
        if isinstance(value, bool)
        else value
        for column, value in zip(table.columns, row, strict=True)
    )


async def _fill_sqlite(conn: aiosqlite.Connection, table: Table, source: Side) -> None:
    insert = (
        f"INSERT INTO {table.name} ({', '.join(table.columns)}) "
        f"VALUES ({', '.join('?' * len(table.columns))})"
    )
    async for chunk in source.chunks(table):
        await conn.executemany(insert, [_to_sqlite(table, row) for row in chunk])
