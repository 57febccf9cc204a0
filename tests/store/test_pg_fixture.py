"""The PostgreSQL test fixture itself: a fresh database per test, dropped after."""

from __future__ import annotations

import asyncpg
import pytest

from tests.pg import ADMIN_URL, fresh_database, server_status, skip_or_fail


async def database_names() -> set[str]:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()


async def test_each_test_gets_an_empty_database_dropped_after(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        assert name.startswith("qbo_test_")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
    finally:
        await conn.close()

    # Another database is dropped even while a connection to it is still open.
    async with fresh_database() as url:
        other = await asyncpg.connect(url)
        other_name = await other.fetchval("SELECT current_database()")
        assert other_name in await database_names()
    assert other_name not in await database_names()
    assert other.is_closed() or not await _alive(other)


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    finally:
        conn.terminate()
    return True


async def test_no_server_skips_on_a_laptop_and_fails_in_ci() -> None:
    answered, detail = await server_status("postgresql://postgres@127.0.0.1:1/postgres")
    assert not answered
    assert "no PostgreSQL at postgresql://postgres@127.0.0.1:1/postgres" in detail
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL at"):
        skip_or_fail(detail, {})
    with pytest.raises(pytest.fail.Exception, match="required when CI=true"):
        skip_or_fail(detail, {"CI": "true"})
