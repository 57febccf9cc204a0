"""The bench's PostgreSQL side: a database per phase, seeded fast, read back after.

``--storage postgresql://user@host:port/db`` names a server (the database in the
URL is only where the bench connects to create its own): each phase gets a new
``qbo_bench_<random>`` database, made from ``template0`` and dropped at the end
after its connections are terminated.

The rows are stored by the daemon's own storage (:meth:`PostgresStorage.insert_accounts`,
one ``COPY`` per chunk, secrets encrypted by the store's row mapper), in two
kinds:

- **grants**: real simulator connections (:class:`bench.dataset.Grant`), timed
  for the phase's scenario (due during the run, or overdue for a storm);
- **idle** accounts: connections the simulator does not know, due later than
  the run (spread over the next ``idle_span``), so they fill each node's window
  of timers and its memory without ever reaching Intuit. They are made in
  ``SEED_WORKERS`` processes (encryption is the cost: about 60 µs a row).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.dataset import HARD_EXPIRY, LEAD, Grant
from qbo_daemon.config.load import default_config
from qbo_daemon.core.models import Account, ImportItem
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.postgres.storage import PostgresStorage

SEED_CHUNK = 20_000  # rows per COPY
SEED_WORKERS = 2


def database_url(server_url: str, name: str) -> str:
    """``server_url`` pointed at database ``name`` (its query string kept)."""
    base, _, query = server_url.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{name}" + (f"?{query}" if query else "")


async def create_database(server_url: str) -> str:
    """A new empty database on the server; its URL."""
    name = f"qbo_bench_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    return database_url(server_url, name)


def database_name(url: str) -> str:
    return url.partition("?")[0].rsplit("/", 1)[1]


async def drop_database(server_url: str, url: str) -> None:
    """Drop the database at ``url``, ending whatever is still connected to it."""
    name = database_name(url)
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass(frozen=True)
class Idle:
    """``count`` accounts the simulator does not know, due in ``[start, start + span]``.

    Named ``idle-<number>`` from ``first`` on.
    """

    count: int
    start: datetime
    span: timedelta
    first: int = 0


async def seed(
    url: str,
    key: str,
    grants: Mapping[str, datetime],
    all_grants: Sequence[Grant],
    idle: Idle | None = None,
) -> dict[str, float]:
    """Store ``grants`` (account id → due time, from ``all_grants``) and ``idle``.

    Returns how long each part took (seconds): the schema, the grants, the idle rows.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    cipher = Cipher([EncryptionKey.from_text(key)])
    storage = await PostgresStorage.open(url, cipher, node_id="bench-seed")
    try:
        schema_done = loop.time()
        now = datetime.now(UTC)
        chosen = [g for g in all_grants if g.account_id in grants]
        for start in range(0, len(chosen), SEED_CHUNK):
            await storage.insert_accounts(
                [
                    _grant_account(g, grants[g.account_id], now)
                    for g in chosen[start : start + SEED_CHUNK]
                ]
            )
    finally:
        await storage.close()
    grants_done = loop.time()
    if idle is not None and idle.count:
        bounds = _split(idle.count, SEED_WORKERS * 4)
        with ProcessPoolExecutor(SEED_WORKERS) as pool:
            jobs = [
                loop.run_in_executor(
                    pool, _seed_idle_part, url, key, idle.first + first, count, idle
                )
                for first, count in bounds
            ]
            await asyncio.gather(*jobs)
    return {
        "schema_s": schema_done - started,
        "grants_s": grants_done - schema_done,
        "idle_s": loop.time() - grants_done,
    }


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    size = -(-total // parts)
    return [(first, min(size, total - first)) for first in range(0, total, size)]


def _seed_idle_part(url: str, key: str, first: int, count: int, idle: Idle) -> int:
    """One worker's share of the idle rows (a process of its own: encryption is CPU)."""
    return asyncio.run(_insert_idle(url, key, first, count, idle))


async def _insert_idle(url: str, key: str, first: int, count: int, idle: Idle) -> int:
    cipher = Cipher([EncryptionKey.from_text(key)])
    storage = await PostgresStorage.open(url, cipher, node_id=f"bench-seed-{first}")
    now = datetime.now(UTC)
    template = _template(now)
    try:
        for start in range(first, first + count, SEED_CHUNK):
            rows = []
            for n in range(start, min(start + SEED_CHUNK, first + count)):
                # Spread evenly (a golden-ratio sequence): any stretch holds its share.
                due = idle.start + idle.span * ((n * 0.6180339887498949) % 1.0)
                rows.append(
                    replace(
                        template,
                        account_id=f"idle-{n:07d}",
                        realm_id=str(9_100_000_000_000_000 + n),
                        access_token=f"idle-at-{n}-" + "x" * 40,
                        refresh_token=f"idle-rt-{n}-" + "y" * 30,
                        token_expires_at=due + LEAD,
                        reconnect_token_at=due,
                    )
                )
            await storage.insert_accounts(rows)
    finally:
        await storage.close()
    return count


def _template(now: datetime) -> Account:
    policy = RefreshPolicy(replace(default_config({}).refresh, lead=LEAD))
    item = ImportItem(
        account_id="template",
        realm_id="1",
        refresh_token="r",
        access_token="a",
        token_expires_at=now + LEAD + timedelta(hours=1),
    )
    return replace(policy.imported(item, now=now), refresh_token_hard_expires_at=now + HARD_EXPIRY)


def _grant_account(grant: Grant, due: datetime, now: datetime) -> Account:
    return replace(
        _template(now),
        account_id=grant.account_id,
        realm_id=grant.realm_id,
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        token_expires_at=due + LEAD,
        reconnect_token_at=due,
    )


async def retime(url: str, due: Mapping[str, datetime]) -> None:
    """Set the timers of the accounts in ``due`` (``token_expires_at`` follows, lead later)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.executemany(
            "UPDATE accounts SET reconnect_token_at = $2, token_expires_at = $3 "
            "WHERE account_id = $1",
            [(account, at, at + LEAD) for account, at in due.items()],
        )
    finally:
        await conn.close()


async def server_version(server_url: str) -> str:
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def committed(url: str) -> int:
    """Refresh attempts committed so far (ids only grow)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        value = await conn.fetchval("SELECT count(*) FROM refresh_attempts")
    finally:
        await conn.close()
    return int(value)


async def wait_committed(url: str, count: int, alive: Any, *, timeout: float, poll: float) -> float:
    """Poll until ``count`` refresh attempts are committed; return that wall time.

    ``alive()`` raises when a daemon died. An attempt is written in the same
    transaction as the tokens it brought: a committed attempt is a durable refresh.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    conn = await asyncpg.connect(url, timeout=10)
    try:
        while True:
            # The highest id (an index's last entry) bounds the count from above: count
            # the rows only once it is there. Ids can skip (a write rolled back), never repeat.
            highest = await conn.fetchval("SELECT COALESCE(MAX(id), 0) FROM refresh_attempts")
            done = 0
            if highest >= count:
                done = await conn.fetchval("SELECT count(*) FROM refresh_attempts")
            if done >= count:
                return datetime.now(UTC).timestamp()
            alive()
            if loop.time() > deadline:
                raise TimeoutError(f"{highest} (by id) of {count} refreshes after {timeout:.0f}s")
            await asyncio.sleep(poll)
    finally:
        await conn.close()


async def attempts(url: str) -> list[tuple[str, float, str]]:
    """Every attempt: account, when its request left (wall seconds), outcome."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT account_id, started_at, outcome FROM refresh_attempts")
    finally:
        await conn.close()
    return [(r["account_id"], r["started_at"].timestamp(), r["outcome"]) for r in rows]


async def durable(url: str) -> dict[str, int]:
    """What is in the database after the daemons stopped: refreshed rows, attempts by outcome."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        refreshed = await conn.fetchval("SELECT count(*) FROM accounts WHERE version > 1")
        outcomes = await conn.fetch(
            "SELECT outcome, count(*) AS n FROM refresh_attempts GROUP BY outcome"
        )
        accounts = await conn.fetchval("SELECT count(*) FROM accounts")
    finally:
        await conn.close()
    return {
        "accounts": accounts,
        "rows_refreshed": refreshed,
        **{f"attempts_{r['outcome']}": r["n"] for r in outcomes},
    }
