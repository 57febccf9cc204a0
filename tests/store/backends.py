"""The two storage backends as a test sees them: open one, and read its rows as an operator would.

A :class:`Backend` opens a real storage (an SQLite file in a temporary
directory, or a fresh PostgreSQL database) and reads and changes the rows
around it, with the database's own client (``sqlite3``, ``asyncpg``), never
through the storage under test. Times come back as the ISO 8601 UTC text
SQLite stores (``2025-03-01T12:00:00.000000Z``), so one assertion holds for
both.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from qbo_daemon.core.models import iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.postgres.schema import schema_version
from qbo_daemon.store.postgres.storage import PostgresStorage
from qbo_daemon.store.repository import Storage

AnyStorage = Storage | PostgresStorage


class Backend:
    """What the shared tests need of a backend; see the module docstring."""

    name: str
    # What each refuses with, as its StorageError says it.
    not_null_error: str
    read_only_error: str

    async def open(self, cipher: Cipher, *, attempts_keep: int = 100_000) -> AnyStorage:
        raise NotImplementedError

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (no parameters), times as ISO text."""
        raise NotImplementedError

    async def execute(self, sql: str) -> None:
        raise NotImplementedError

    async def execute_all(self, statements: list[str]) -> None:
        """Each of ``statements`` (no parameters), in one transaction."""
        raise NotImplementedError

    async def schema_version(self) -> int:
        raise NotImplementedError

    async def refuse_inserts_of(self, account_id: str, message: str) -> None:
        """A trigger that fails the insert of ``account_id`` with ``message``, late."""
        raise NotImplementedError

    async def set_read_only(self, storage: AnyStorage, on: bool) -> None:
        """Make ``storage``'s connections refuse writes (or take them again)."""
        raise NotImplementedError

    async def row(self, account_id: str, columns: str) -> tuple[Any, ...]:
        # account_id values in the tests are constants without quotes.
        rows = await self.query(
            f"SELECT {columns} FROM accounts WHERE account_id = '{account_id}'"  # noqa: S608
        )
        assert len(rows) == 1, rows
        return rows[0]

    async def count(self, table: str) -> int:
        ((count,),) = await self.query(f"SELECT COUNT(*) FROM {table}")  # noqa: S608
        return int(count)

    async def key_ids_stored(self) -> set[str]:
        """Every key id in use: the key_id column and each ciphertext's own."""
        found = set()
        for key_id, *secrets in await self.query(
            "SELECT key_id, realm_id, access_token, refresh_token FROM accounts"
        ):
            found.add(key_id)
            found.update(Cipher.key_id_of(value) for value in secrets if value is not None)
        return found


class SqliteBackend(Backend):
    name = "sqlite"
    not_null_error = "database write failed: NOT NULL"
    read_only_error = r"database write failed: .*readonly"

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self, cipher: Cipher, *, attempts_keep: int = 100_000) -> AnyStorage:
        return await Storage.open(self.path, cipher, attempts_keep=attempts_keep)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return conn.execute(sql).fetchall()

    async def execute(self, sql: str) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute(sql)

    async def execute_all(self, statements: list[str]) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            for sql in statements:
                conn.execute(sql)

    async def schema_version(self) -> int:
        ((version,),) = await self.query("PRAGMA user_version")
        return int(version)

    async def refuse_inserts_of(self, account_id: str, message: str) -> None:
        await self.execute(
            f"CREATE TRIGGER refuse_{account_id} BEFORE INSERT ON accounts "
            f"WHEN NEW.account_id = '{account_id}' BEGIN SELECT RAISE(ABORT, '{message}'); END"
        )

    async def set_read_only(self, storage: AnyStorage, on: bool) -> None:
        assert isinstance(storage, Storage)
        await storage._db._writer.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")


class PostgresBackend(Backend):
    name = "postgresql"
    not_null_error = 'database write failed: null value in column "account_id"'
    read_only_error = "database write failed: cannot execute .* in a read-only transaction"

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self, cipher: Cipher, *, attempts_keep: int = 100_000) -> AnyStorage:
        return await PostgresStorage.open(self.url, cipher, attempts_keep=attempts_keep)

    @contextlib.asynccontextmanager
    async def _connection(self) -> Any:
        # Writable whatever the database's default (see set_read_only).
        conn = await asyncpg.connect(
            self.url, server_settings={"default_transaction_read_only": "off"}
        )
        try:
            yield conn
        finally:
            await conn.close()

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            records = await conn.fetch(sql)
        return [tuple(_as_text(value) for value in record.values()) for record in records]

    async def execute(self, sql: str) -> None:
        async with self._connection() as conn:
            await conn.execute(sql)

    async def execute_all(self, statements: list[str]) -> None:
        async with self._connection() as conn, conn.transaction():
            for sql in statements:
                await conn.execute(sql)

    async def schema_version(self) -> int:
        async with self._connection() as conn:
            return await schema_version(conn)

    async def refuse_inserts_of(self, account_id: str, message: str) -> None:
        await self.execute(
            f"""
            CREATE FUNCTION refuse_{account_id}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.account_id = '{account_id}' THEN RAISE EXCEPTION '{message}'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_{account_id} BEFORE INSERT ON accounts
                FOR EACH ROW EXECUTE FUNCTION refuse_{account_id}();
            """
        )

    async def set_read_only(self, storage: AnyStorage, on: bool) -> None:
        # New sessions start read-only; the pool's idle connections are replaced by new ones.
        assert isinstance(storage, PostgresStorage)
        name = self.url.rsplit("/", 1)[1]
        value = "on" if on else "off"
        await self.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}')
        await storage._db._pool.expire_connections()


def _as_text(value: object) -> object:
    """A time as SQLite stores it; anything else as it is."""
    return iso(value) if isinstance(value, datetime) else value
