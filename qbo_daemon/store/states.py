"""Pending OAuth states: issued with an authorization URL, used once by the callback."""

from __future__ import annotations

from datetime import datetime, timedelta

from qbo_daemon.core.errors import OAuthStateError
from qbo_daemon.core.models import iso, parse_iso
from qbo_daemon.store.port import StateRecord
from qbo_daemon.store.sqlite import Database


class OAuthStates:
    """The ``oauth_states`` table. Each write is its own transaction."""

    def __init__(self, database: Database) -> None:
        self._db = database

    async def create(self, state: str, account_id: str, *, now: datetime, ttl: timedelta) -> None:
        async with self._db.transaction() as conn:
            # Forget states long past their expiry so the table stays small.
            await conn.execute(
                "DELETE FROM oauth_states WHERE expires_at < ?", (iso(now - timedelta(days=1)),)
            )
            await conn.execute(
                "INSERT INTO oauth_states (state, account_id, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (state, account_id, iso(now), iso(now + ttl)),
            )

    async def consume(self, state: str, *, now: datetime) -> str:
        """Mark ``state`` used and return the account it was issued for.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired`` or
        ``used``; a failed check changes nothing.
        """
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
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
            await conn.execute(
                "UPDATE oauth_states SET used_at = ? WHERE state = ?", (iso(now), state)
            )
            return str(row["account_id"])

    async def finish(self, state: str, outcome: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE oauth_states SET outcome = ? WHERE state = ?", (outcome, state)
            )

    async def get(self, state: str) -> StateRecord | None:
        row = await self._db.fetchone(
            "SELECT account_id, outcome FROM oauth_states WHERE state = ?", (state,)
        )
        if row is None:
            return None
        return StateRecord(account_id=row["account_id"], outcome=row["outcome"])
