"""One SQLite file through two connections: durable transactions, group commit, batched reads.

Two aiosqlite connections share the file in WAL mode: one writes, one reads, so
a read never sees another coroutine's uncommitted transaction and reads don't
queue behind the writer. Every write starts with ``BEGIN IMMEDIATE`` and
commits under ``synchronous=FULL``: a write that returned is on disk.

Compare-and-swap writes go through a group-commit queue: writes finishing
together share one transaction and one fsync, and each caller returns only
after that commit (a stale write fails alone, the others commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from qbo_daemon.core.errors import StaleWriteError, StorageError
from qbo_daemon.store.rows import INSERT_ATTEMPT, update_statement
from qbo_daemon.store.schema import migrate

log = structlog.get_logger("qbo_daemon.store.sqlite")

# How many attempt rows may be written between two trims of the attempts table.
_TRIM_EVERY = 1000
# Keys per query when concurrent reads are served together.
_READ_BATCH = 500
# How long a write waits for the writes behind it before its commit starts. In a
# storm the refreshes that answer meanwhile share the commit: one fsync, one
# hand-off to the writer thread and one wake-up of the loop for all of them
# (docs/performance.md, "The floor"). Nothing waits on a commit for so little to matter.
_GATHER_SECONDS = 0.002


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """A compare-and-swap update of one ``accounts`` row: ``values`` into ``columns``.

    ``columns`` are names from :data:`~qbo_daemon.store.rows.ACCOUNT_COLUMNS`,
    and they pick the statement (:func:`~qbo_daemon.store.rows.update_statement`).
    """

    account_id: str
    read_version: int
    columns: tuple[str, ...]
    values: tuple[Any, ...]

    @property
    def parameters(self) -> tuple[Any, ...]:
        return (*self.values, self.account_id, self.read_version)

    @property
    def sql(self) -> str:
        return update_statement(self.columns)


@dataclass(frozen=True, slots=True)
class WriteJob:
    """One caller's write for the group commit: an account update, an attempt, or both.

    With an update, the job is all or nothing: a stale update writes its attempt
    neither.
    """

    update: RowUpdate | None
    attempt: tuple[Any, ...] | None  # the parameters of rows.INSERT_ATTEMPT


@dataclass
class _Job:
    job: WriteJob
    future: asyncio.Future[None]


def _create_if_missing(path: Path) -> None:
    """Create an empty, owner-only database file at ``path`` if none is there (logged)."""
    if not path.parent.is_dir():
        raise StorageError(
            f"cannot open database {path}: its directory {path.parent} does not exist"
        )
    try:
        # Owner-only: SQLite gives the -wal and -shm files the main file's mode,
        # and a later chmod would not reach them.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    os.close(fd)
    log.warning(
        "storage.database_created",
        path=os.path.abspath(path),
        detail="no database was at this path: a new, empty one was created",
    )


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


class Database:
    """The writer and reader connections of one SQLite file, and the writer's queue.

    The writer also trims the append-only ``refresh_attempts`` table to its newest
    ``attempts_keep`` rows, in a batch's transaction, as it counts the attempts it writes.
    """

    def __init__(
        self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, *, attempts_keep: int
    ) -> None:
        self._writer = writer
        self._reader = reader
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
    async def open(cls, path: Path, *, attempts_keep: int) -> Database:
        """Open (creating or migrating) the database at ``path``; start the writer.

        The directory must exist: a typo in the path must not silently start an
        empty database somewhere new. A new database is logged at warning level.
        """
        _create_if_missing(path)
        try:
            writer = await _connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        try:
            await migrate(writer, path)
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        database = cls(writer, reader, attempts_keep=attempts_keep)
        database._writer_task = asyncio.create_task(database._write_loop(), name="storage-writer")
        return database

    @property
    def writer(self) -> asyncio.Task[None] | None:
        """The group-commit writer task (the daemon's supervisor watches it)."""
        return self._writer_task

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        self._closing = True
        if self._writer_task is not None:
            self._queued.set()
            # asyncio.wait: a writer that died (the supervisor reported it) must not keep
            # the connections open.
            await asyncio.wait({self._writer_task})
            self._writer_task = None
        async with self._tx_lock:  # let an open transaction finish first
            await self._reader.close()
            await self._writer.close()

    # -- reading -----------------------------------------------------------

    async def fetchone(self, sql: str, params: Iterable[Any]) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # One round trip to the reader thread (execute, fetch and close would be three,
        # each waiting for a turn of a busy event loop).
        try:
            rows = await self._reader.execute_fetchall(sql, tuple(params))
        except sqlite3.Error as exc:
            raise StorageError(f"database read failed: {exc}") from exc
        return list(rows)

    # -- writing -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction on the writer, committed on a clean exit."""
        async with self._tx_lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"database write failed: {exc}") from exc
            try:
                yield self._writer
                await self._writer.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    await self._writer.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"database write failed: {exc}") from exc
                raise

    async def run_transaction(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction on the writer thread.

        One hand-off to the writer's thread for the whole transaction, however many
        statements ``fn`` runs: the group commit waits behind it for no more than
        ``fn`` itself. Committed when ``fn`` returns, rolled back when it raises.
        """
        async with self._tx_lock:
            try:
                return await _on_writer_thread(self._writer, partial(_in_transaction, fn))
            except sqlite3.Error as exc:
                raise StorageError(f"database write failed: {exc}") from exc

    async def write(self, job: WriteJob) -> None:
        """Run ``job`` in the next group commit; return once it committed.

        When its update changes no row (the version moved on), nothing of the job
        is written and :class:`StaleWriteError` is raised.
        """
        if self._closing or self._writer_task is None or self._writer_task.done():
            raise StorageError("storage is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller cancelled meanwhile never reads its outcome; read it here so
        # asyncio does not report an exception "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append(_Job(job, future))
        self._queued.set()
        # Shielded: a caller cancelled at shutdown must not leave its write half-known;
        # the write still commits with its batch.
        await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            await self._queued.wait()
            if not self._closing:
                await asyncio.sleep(_GATHER_SECONDS)
            self._queued.clear()
            jobs, self._queue = self._queue, []
            if jobs:
                async with self._tx_lock:
                    await self._commit_batch(jobs)
            if self._closing and not self._queue:
                return

    async def _commit_batch(self, jobs: list[_Job]) -> None:
        """Run many callers' writes in one transaction and one fsync."""
        batch = [job.job for job in jobs]
        try:
            stale, attempts, trimmed = await _on_writer_thread(
                self._writer,
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
            update = job.job.update
            if index in stale and update is not None:
                job.future.set_exception(StaleWriteError(update.account_id, update.read_version))
            else:
                job.future.set_result(None)


class ReadBatcher:
    """Reads of one row by key that arrive together, served by one query.

    In a storm dozens of refreshes read their row at once: one query and one
    round trip to the reader thread serve all of them, where one each would
    queue behind each other and wait a turn of the busy event loop apiece.
    Every read still sees what was committed when it was asked for, or later.
    """

    def __init__(
        self, query: Callable[[list[str]], Awaitable[list[sqlite3.Row]]], *, key: str
    ) -> None:
        self._query = query  # the rows of these keys (at most _READ_BATCH of them)
        self._key = key  # the column that holds a row's key
        self._wanted: dict[str, list[asyncio.Future[sqlite3.Row | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, key: str) -> sqlite3.Row | None:
        """The row of ``key``, or None when there is none."""
        future: asyncio.Future[sqlite3.Row | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(key, []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._read_wanted_rows(), name="storage-reader")
        return await future

    async def _read_wanted_rows(self) -> None:
        """Read every row asked for, many per query, until no one waits."""
        wanted: dict[str, list[asyncio.Future[sqlite3.Row | None]]] = {}
        try:
            while self._wanted:
                wanted, self._wanted = self._wanted, {}
                keys = list(wanted)
                try:
                    rows: list[sqlite3.Row] = []
                    for start in range(0, len(keys), _READ_BATCH):
                        rows += await self._query(keys[start : start + _READ_BATCH])
                except Exception as exc:  # each asker gets the failure as its own read would
                    for futures in wanted.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                found = {row[self._key]: row for row in rows}
                for key, futures in wanted.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(key))
        finally:
            self._task = None
            for futures in (*wanted.values(), *self._wanted.values()):
                for future in futures:
                    future.cancel()  # a no-op for the answered ones


_T = TypeVar("_T")


async def _on_writer_thread(
    conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], _T]
) -> _T:
    """Run ``fn`` with ``conn``'s sqlite3 connection on its own thread: one round trip.

    A group commit as separate ``execute`` calls costs a round trip per statement,
    and each waits for a turn of the busy event loop (milliseconds in a storm).
    aiosqlite has no public call for this; ``_execute`` and ``_conn`` are what its
    own cursors use. They are private, so pyproject.toml caps aiosqlite below its
    next minor release: a new one is admitted once these tests pass on it.
    """
    result: _T = await conn._execute(fn, conn._conn)  # type: ignore[no-untyped-call]
    return result


def _in_transaction(fn: Callable[[sqlite3.Connection], _T], db: sqlite3.Connection) -> _T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return result


def _write_batch(
    db: sqlite3.Connection, *, jobs: list[WriteJob], trim_after: int, keep: int
) -> tuple[set[int], int, bool]:
    """The group commit's transaction, on the writer thread.

    Returns the indexes of the stale jobs, the attempts written, and whether the
    attempts table was trimmed (once ``trim_after`` attempts are written).
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


def _run_grouped(db: sqlite3.Connection, jobs: list[WriteJob]) -> int | None:
    """Run the batch as one ``executemany`` per statement; the attempts written.

    Taken only when it cannot change the outcome: every update is on a different
    account, and attempts only append (in job order), so the grouped statements
    write what job-by-job ones would. Returns None when that does not hold
    (nothing run), or when an update was stale (the caller rolls back and runs
    job by job, so the stale write fails alone).
    """
    updates = [job.update for job in jobs if job.update is not None]
    if len({update.account_id for update in updates}) != len(updates):
        return None
    statements: dict[str, list[tuple[Any, ...]]] = {}
    for update in updates:
        statements.setdefault(update.sql, []).append(update.parameters)
    for sql, rows in statements.items():
        if db.executemany(sql, rows).rowcount != len(rows):
            return None
    attempts = [job.attempt for job in jobs if job.attempt is not None]
    if attempts:
        db.executemany(INSERT_ATTEMPT, attempts)
    return len(attempts)


def _run_one_by_one(db: sqlite3.Connection, jobs: list[WriteJob], stale: set[int]) -> int:
    """Run each job in turn; a stale update skips its job."""
    attempts = 0
    for index, job in enumerate(jobs):
        if job.update is not None:
            update = job.update
            if db.execute(update.sql, update.parameters).rowcount != 1:
                stale.add(index)
                continue
        if job.attempt is not None:
            db.execute(INSERT_ATTEMPT, job.attempt)
            attempts += 1
    return attempts
