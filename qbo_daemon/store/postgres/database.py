"""One PostgreSQL database through asyncpg: a pool for work, one connection for LISTEN.

Every operation borrows a pool connection; a write runs in one transaction
and is shielded, like the SQLite writer's: a caller cancelled at shutdown
does not leave its write half-known, it still commits or fails whole. Any
driver or server error becomes a :class:`StorageError` that never carries
the URL's password. :meth:`PgDatabase.close` lets operations in flight
finish, then closes the pool.

The LISTEN connection is separate from the pool because a listener must stay
on one session; notifications are sent (``pg_notify``) inside the writing
transaction and delivered when it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from qbo_daemon.core.dburl import redact_url, scrub_url_secrets
from qbo_daemon.core.errors import StorageError
from qbo_daemon.store.postgres.schema import migrate

# A pool connection, as the operations get it (a string: the class is generic only to mypy).
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
_T = TypeVar("_T")
DAEMON_APPLICATION = "qbo-daemon"
# What the driver and the network raise; each becomes a StorageError.
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection the server cut, caught mid-state
    OSError,
    TimeoutError,
)
# Connecting also raises ValueError for a URL asyncpg cannot read (a bad port, say).
_CONNECT_ERRORS: tuple[type[Exception], ...] = (*DRIVER_ERRORS, ValueError)


@dataclass(frozen=True, slots=True)
class PgSettings:
    """Pool size and timeouts (seconds). One daemon needs about its refresh concurrency + 4."""

    min_size: int = 2
    max_size: int = 10
    connect_timeout: float = 10.0
    command_timeout: float = 30.0  # per statement
    acquire_timeout: float = 30.0  # waiting for a free pool connection
    # Prepared statements kept per connection. The daemon runs a fixed few dozen
    # statements, so they all stay prepared; 0 is for a pooler that cannot keep
    # them (PgBouncer in transaction mode before 1.21).
    statement_cache_size: int = 100
    close_timeout: float = 30.0
    # How the sessions show in pg_stat_activity (migrate-storage looks for daemons by it).
    application_name: str = DAEMON_APPLICATION


class _PoolConnection(asyncpg.Connection):
    """A pool connection given back without asyncpg's reset query (four statements).

    The daemon leaves no session state on a pool connection: its advisory
    locks are per transaction, LISTEN has its own connection, nothing is SET,
    and a connection whose transaction failed is rolled back by asyncpg.
    """

    def get_reset_query(self) -> str:
        return ""


def _server_settings(settings: PgSettings) -> dict[str, str]:
    return {"application_name": settings.application_name}


class PgDatabase:
    """The pool and the LISTEN connection of one database; see the module docstring."""

    def __init__(
        self, url: str, pool: asyncpg.Pool, listener: asyncpg.Connection, settings: PgSettings
    ) -> None:
        self._url = url
        self.where = redact_url(url)  # the only form of the URL that may be shown
        self._pool = pool
        self._listener = listener
        self._settings = settings
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._channels: dict[str, Callable[[str], None]] = {}

    @classmethod
    async def open(cls, url: str, settings: PgSettings | None = None) -> PgDatabase:
        """Connect, bring the schema up to date, and open the LISTEN connection."""
        settings = settings or PgSettings()
        where = redact_url(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=settings.min_size,
                max_size=settings.max_size,
                timeout=settings.connect_timeout,
                command_timeout=settings.command_timeout,
                statement_cache_size=settings.statement_cache_size,
                server_settings=_server_settings(settings),
                connection_class=_PoolConnection,
            )
        except _CONNECT_ERRORS as exc:
            raise StorageError(
                f"cannot connect to PostgreSQL at {where}: {_reason(exc, url)}"
            ) from None
        try:
            async with pool.acquire(timeout=settings.acquire_timeout) as conn:
                await migrate(conn, where)
            listener = await asyncpg.connect(
                url,
                timeout=settings.connect_timeout,
                statement_cache_size=0,
                server_settings=_server_settings(settings),
            )
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, DRIVER_ERRORS):
                raise StorageError(
                    f"cannot open PostgreSQL at {where}: {_reason(exc, url)}"
                ) from None
            raise
        return cls(url, pool, listener, settings)

    async def close(self) -> None:
        """Let operations in flight finish, then close every connection."""
        self._closing = True
        await self._idle.wait()
        with contextlib.suppress(*DRIVER_ERRORS):
            await self._listener.close(timeout=self._settings.close_timeout)
        try:
            await asyncio.wait_for(self._pool.close(), self._settings.close_timeout)
        except DRIVER_ERRORS:
            self._pool.terminate()

    # -- operations ----------------------------------------------------------------

    def _begin(self) -> None:
        """Count an operation in flight, or refuse it once closing."""
        if self._closing:
            raise StorageError("storage is closed")
        self._active += 1
        self._idle.clear()

    def _end(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def _connection(self, *, writing: bool, transaction: bool = True) -> AsyncIterator[Conn]:
        """A pool connection for one operation (in a transaction when ``writing``, unless
        it is one statement, which is a transaction of its own)."""
        try:
            async with self._pool.acquire(timeout=self._settings.acquire_timeout) as conn:
                if writing and transaction:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except DRIVER_ERRORS as exc:
            action = "write" if writing else "read"
            raise StorageError(f"database {action} failed: {_reason(exc, self._url)}") from None

    async def read(self, work: Callable[[Conn], Awaitable[_T]]) -> _T:
        """Run ``work`` on a pool connection."""
        self._begin()
        try:
            async with self._connection(writing=False) as conn:
                return await work(conn)
        finally:
            self._end()

    async def write(self, work: Callable[[Conn], Awaitable[_T]]) -> _T:
        """Run ``work`` in one transaction, committed when it returns, rolled back if it raises.

        Shielded: cancelling the caller does not cancel the transaction, and
        :meth:`close` waits for it.
        """
        self._begin()

        async def run() -> _T:
            try:
                async with self._connection(writing=True) as conn:
                    return await work(conn)
            finally:
                self._end()

        task = asyncio.ensure_future(run())
        # A caller cancelled meanwhile never reads the outcome; read it here so asyncio
        # does not report an exception "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def write_one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """One statement that writes, committed on its own (no BEGIN/COMMIT round trips).

        Shielded like :meth:`write`; its first row, or None.
        """
        self._begin()

        async def run() -> asyncpg.Record | None:
            try:
                async with self._connection(writing=True, transaction=False) as conn:
                    return await conn.fetchrow(sql, *args)
            finally:
                self._end()

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.read(lambda conn: conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.read(lambda conn: conn.fetchrow(sql, *args))

    # -- notifications -------------------------------------------------------------

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` for every notification on ``channel``, once committed."""
        self._channels[channel] = callback
        try:
            await self._listener.add_listener(channel, _deliver(callback))
        except DRIVER_ERRORS as exc:
            raise StorageError(f"cannot listen on {channel}: {_reason(exc, self._url)}") from None

    async def relisten(self) -> bool:
        """Reconnect the LISTEN connection if the server cut it; True if it did.

        Notifications sent while it was cut are lost: a caller told True reads
        again what it keeps of the database.
        """
        if not self._listener.is_closed() or self._closing:
            return False
        try:
            listener = await asyncpg.connect(
                self._url,
                timeout=self._settings.connect_timeout,
                statement_cache_size=0,
                server_settings=_server_settings(self._settings),
            )
        except _CONNECT_ERRORS as exc:
            raise StorageError(f"cannot listen again: {_reason(exc, self._url)}") from None
        try:
            for channel, callback in self._channels.items():
                await listener.add_listener(channel, _deliver(callback))
        except DRIVER_ERRORS as exc:
            with contextlib.suppress(*DRIVER_ERRORS):
                await listener.close(timeout=self._settings.close_timeout)
            raise StorageError(f"cannot listen again: {_reason(exc, self._url)}") from None
        self._listener = listener
        return True


def _deliver(callback: Callable[[str], None]) -> Callable[[object, int, str, object], None]:
    def deliver(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        callback(str(payload))

    return deliver


def _reason(exc: BaseException, url: str) -> str:
    """The error as one line, with anything secret from ``url`` masked."""
    text = str(exc) or type(exc).__name__
    return scrub_url_secrets(text, url)
