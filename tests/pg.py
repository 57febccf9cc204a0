"""A real PostgreSQL server for tests: a fresh database per test, dropped after.

The server is the machine's (127.0.0.1:5432, user ``postgres``, trust auth;
``$QBO_TEST_POSTGRES`` names another admin URL). Each test gets its own
``qbo_test_<random>`` database, made from ``template0`` and dropped at the end
after its connections are terminated, so tests never see each other's rows.

When no server answers, a PostgreSQL test is skipped with the reason on a
laptop, but FAILS when ``CI=true``: a green CI must mean these tests ran.

``python -m tests.pg`` prints one line saying whether the server answers
(``scripts/check`` shows it in its ``== postgresql`` section).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import NoReturn

import asyncpg
import pytest

from qbo_daemon.core.dburl import redact_url

ADMIN_URL = os.environ.get("QBO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
_CONNECT_TIMEOUT = 3.0
# Whether the server answered, once per test session: (answered, why not).
_probe: tuple[bool, str] | None = None


async def _admin(url: str = ADMIN_URL) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=_CONNECT_TIMEOUT)


async def server_status(url: str = ADMIN_URL) -> tuple[bool, str]:
    """(True, the server's version) when it answers at ``url``, else (False, why not)."""
    try:
        conn = await _admin(url)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return False, f"no PostgreSQL at {redact_url(url)}: {type(exc).__name__}: {exc}"
    try:
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return True, f"PostgreSQL {version} at {redact_url(url)}"


def skip_or_fail(detail: str, environ: Mapping[str, str]) -> NoReturn:
    """Skip the calling test, or fail it when ``CI=true``: CI must run these tests."""
    if environ.get("CI") == "true":
        pytest.fail(f"{detail}; PostgreSQL is required when CI=true")
    pytest.skip(detail)


async def require_server() -> None:
    """Return when the server answers; otherwise skip (or fail) the calling test."""
    global _probe
    if _probe is None:
        _probe = await server_status()
    answered, detail = _probe
    if not answered:
        skip_or_fail(detail, os.environ)


def database_url(name: str) -> str:
    """The admin URL pointed at database ``name``."""
    base, _, query = ADMIN_URL.partition("?")
    base = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    return f"{base}/{name}" + (f"?{query}" if query else "")


async def create_database() -> str:
    """A new empty database; its name."""
    name = f"qbo_test_{secrets.token_hex(6)}"
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    """Drop ``name``, first ending whatever is still connected to it."""
    conn = await _admin()
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new database, dropped on exit; skips or fails as the module says."""
    await require_server()
    name = await create_database()
    try:
        yield database_url(name)
    finally:
        await drop_database(name)


if __name__ == "__main__":
    answered, detail = asyncio.run(server_status())
    if answered:
        print(f"{detail}: answering")
    else:
        print(f"{detail}; the PostgreSQL tests will be skipped (they fail when CI=true)")
    sys.exit(0)
