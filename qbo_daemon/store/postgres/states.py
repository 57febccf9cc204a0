"""Pending OAuth states on PostgreSQL: issued with an authorization URL, used once.

The same table and rules as SQLite's ``store/states.py``, through its helpers:
a state kept only as its SHA-256 (``state_hash``), the first callback's
answer hash deciding ``replayed`` from ``used``, the PKCE verifier encrypted
bound to its row, at most :data:`MAX_PENDING` pending states per account.

Several daemons share the table, so what SQLite gets from its single writer
is explicit here: a state is claimed under ``SELECT … FOR UPDATE`` (two
callbacks with one state, on two nodes or double-fired, cannot both use it),
and a new state takes a transaction-level advisory lock on its account, so
two nodes issuing URLs for one account at once keep the cap.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from qbo_daemon.core.models import utc
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.postgres.database import Conn, PgDatabase
from qbo_daemon.store.schema import sha256_hex
from qbo_daemon.store.states import (
    FORGET_AFTER,
    MAX_PENDING,
    ClaimedState,
    StateRecord,
    open_verifier,
    refusal,
    seal_verifier,
)

# The first key of the two-key advisory locks taken per account while creating a state
# ("qbos"); the two-key space never meets the one-key locks (schema.MIGRATION_LOCK).
STATES_LOCK = 0x71626F73


class OAuthStates:
    """The ``oauth_states`` table. Each write is its own transaction."""

    def __init__(self, database: PgDatabase) -> None:
        self._db = database

    async def create(
        self,
        state: str,
        account_id: str,
        *,
        now: datetime,
        ttl: timedelta,
        cipher: Cipher,
        code_verifier: str | None = None,
        allow_realm_change: bool = False,
    ) -> int:
        """Store a new state; returns how many older pending states of the account it dropped."""
        state_hash = sha256_hex(state)
        verifier = None
        if code_verifier is not None:
            verifier = seal_verifier(cipher, code_verifier, state_hash)

        async def work(conn: Conn) -> int:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", STATES_LOCK, account_id
            )
            # Forget states long past their expiry so the table stays small.
            await conn.execute(
                "DELETE FROM oauth_states WHERE expires_at < $1", utc(now - FORGET_AFTER)
            )
            # Keep the newest MAX_PENDING - 1 pending ones (``seq``, insertion order, breaks
            # ties as SQLite's rowid does), to make room for this one.
            dropped = await conn.fetchval(
                "WITH gone AS (DELETE FROM oauth_states WHERE seq IN (SELECT seq "
                "FROM oauth_states WHERE account_id = $1 AND used_at IS NULL "
                "AND expires_at > $2 ORDER BY created_at DESC, seq DESC OFFSET $3) "
                "RETURNING 1) SELECT count(*) FROM gone",
                account_id,
                utc(now),
                MAX_PENDING - 1,
            )
            await conn.execute(
                "INSERT INTO oauth_states (state_hash, account_id, created_at, expires_at, "
                "code_verifier, allow_realm_change) VALUES ($1, $2, $3, $4, $5, $6)",
                state_hash,
                account_id,
                utc(now),
                utc(now + ttl),
                verifier,
                allow_realm_change,
            )
            return int(dropped or 0)

        return await self._db.write(work)

    async def consume(
        self, state: str, answer: str, *, now: datetime, cipher: Cipher
    ) -> ClaimedState:
        """Mark ``state`` used by ``answer`` (an ``answer_hash``) and return its claim.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired``,
        ``replayed`` or ``used``; a failed check (or a verifier that does not
        decrypt) changes nothing.
        """
        state_hash = sha256_hex(state)

        async def work(conn: Conn) -> ClaimedState:
            row = await conn.fetchrow(
                "SELECT account_id, expires_at, used_at, answer_hash, code_verifier, "
                "allow_realm_change FROM oauth_states WHERE state_hash = $1 FOR UPDATE",
                state_hash,
            )
            refused = refusal(
                found=row is not None,
                used=row is not None and row["used_at"] is not None,
                first_answer=None if row is None else row["answer_hash"],
                answer=answer,
                expires_at=None if row is None else row["expires_at"],
                now=utc(now),
            )
            if refused is not None:
                raise refused
            assert row is not None  # refusal() refuses a state not found
            verifier = row["code_verifier"]
            if verifier is not None:
                verifier = open_verifier(cipher, verifier, state_hash)
            await conn.execute(
                "UPDATE oauth_states SET used_at = $1, answer_hash = $2 WHERE state_hash = $3",
                utc(now),
                answer,
                state_hash,
            )
            return ClaimedState(
                account_id=str(row["account_id"]),
                allow_realm_change=bool(row["allow_realm_change"]),
                code_verifier=verifier,
            )

        return await self._db.write(work)

    async def finish(self, state: str, outcome: str) -> None:
        await self._db.write(
            lambda conn: conn.execute(
                "UPDATE oauth_states SET outcome = $1 WHERE state_hash = $2",
                outcome,
                sha256_hex(state),
            )
        )

    async def get(self, state: str) -> StateRecord | None:
        row = await self._db.fetchrow(
            "SELECT account_id, outcome FROM oauth_states WHERE state_hash = $1",
            sha256_hex(state),
        )
        if row is None:
            return None
        return StateRecord(account_id=row["account_id"], outcome=row["outcome"])
