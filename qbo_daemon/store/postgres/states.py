"""Pending OAuth states on PostgreSQL: issued with an authorization URL, used once.

The same rules as SQLite's ``store/states.py``; a state is consumed with
``SELECT … FOR UPDATE``, so two callbacks with one state (two nodes, a
double-fired redirect) cannot both use it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from qbo_daemon.core.errors import OAuthStateError
from qbo_daemon.core.models import utc
from qbo_daemon.store.postgres.database import Conn, PgDatabase
from qbo_daemon.store.states import StateRecord


class OAuthStates:
    """The ``oauth_states`` table. Each write is its own transaction."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def create(self, state: str, account_id: str, *, now: datetime, ttl: timedelta) -> None:
        async def work(conn: Conn) -> None:
            # Forget states long past their expiry so the table stays small.
            await conn.execute(
                "DELETE FROM oauth_states WHERE expires_at < $1", utc(now - timedelta(days=1))
            )
            await conn.execute(
                "INSERT INTO oauth_states (state, account_id, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4)",
                state,
                account_id,
                utc(now),
                utc(now + ttl),
            )

        await self._db.write(work)

    async def consume(self, state: str, *, now: datetime) -> str:
        """Mark ``state`` used and return the account it was issued for.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired`` or
        ``used``; a failed check changes nothing.
        """

        async def work(conn: Conn) -> str:
            row = await conn.fetchrow(
                "SELECT account_id, expires_at, used_at FROM oauth_states "
                "WHERE state = $1 FOR UPDATE",
                state,
            )
            if row is None:
                raise OAuthStateError(
                    "unknown", "This sign-in link is not known. Start connecting again."
                )
            if row["used_at"] is not None:
                raise OAuthStateError("used", "This sign-in link has already been used.")
            if row["expires_at"] <= utc(now):
                raise OAuthStateError(
                    "expired", "This sign-in link has expired. Start connecting again."
                )
            await conn.execute(
                "UPDATE oauth_states SET used_at = $1 WHERE state = $2", utc(now), state
            )
            return str(row["account_id"])

        return await self._db.write(work)

    async def finish(self, state: str, outcome: str) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE oauth_states SET outcome = $1 WHERE state = $2", outcome, state
            )
        )

    async def get(self, state: str) -> StateRecord | None:
        row = await self._db.fetchrow(
            "SELECT account_id, outcome FROM oauth_states WHERE state = $1", state
        )
        if row is None:
            return None
        return StateRecord(account_id=row["account_id"], outcome=row["outcome"])
