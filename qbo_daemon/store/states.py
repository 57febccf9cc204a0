"""Pending OAuth states: issued with an authorization URL, used once by the callback.

A state is kept only as its SHA-256 (``state_hash``): a reader of the database
cannot finish someone's connect flow with it. The first callback of a state
records a hash of its answer (the code, or the error) beside the outcome, so a
double-fired callback can be shown its first outcome again while any other
use of the state is refused. The PKCE verifier, when there is one, is
encrypted bound to its row (table, column and ``state_hash``).

Each account may have at most :data:`MAX_PENDING` states pending (unused and
unexpired): a new one drops the oldest beyond that. An app that asks for URL
after URL keeps working with the newest ones, and the table stays small.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from qbo_daemon.core.errors import OAuthStateError
from qbo_daemon.core.models import iso, parse_iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import ClaimedState, StateRecord
from qbo_daemon.store.schema import sha256_hex
from qbo_daemon.store.sqlite import Database

__all__ = [
    "FORGET_AFTER",
    "MAX_PENDING",
    "ClaimedState",
    "OAuthStates",
    "StateRecord",
    "answer_hash",
    "open_verifier",
    "refusal",
    "seal_verifier",
]

MAX_PENDING = 10
# States this long past their expiry are deleted when a new one is created.
FORGET_AFTER = timedelta(days=1)

_TABLE = "oauth_states"
_VERIFIER = "code_verifier"


def answer_hash(code: str | None, error: str | None) -> str:
    """What identifies one callback's answer for a state: its code, or its error."""
    if error is not None:
        return sha256_hex(f"error\0{error}")
    return sha256_hex(f"code\0{code or ''}")


def seal_verifier(cipher: Cipher, code_verifier: str, state_hash: str) -> str:
    """A PKCE verifier as stored: encrypted, bound to its state's row (both backends)."""
    return cipher.encrypt(code_verifier, table=_TABLE, column=_VERIFIER, row_key=state_hash)


def open_verifier(cipher: Cipher, sealed: str, state_hash: str) -> str:
    """The verifier :func:`seal_verifier` stored for ``state_hash``; DecryptionError if moved."""
    return cipher.decrypt(sealed, table=_TABLE, column=_VERIFIER, row_key=state_hash)


def refusal(
    *,
    found: bool,
    used: bool,
    first_answer: str | None,
    answer: str,
    expires_at: datetime | None,
    now: datetime,
) -> OAuthStateError | None:
    """Why a callback may not claim a state (None: it may): the rules both backends apply.

    ``unknown``; ``replayed`` (used before, by this same answer) or ``used``
    (by another answer); ``expired``.
    """
    if not found:
        return OAuthStateError("unknown", "This sign-in link is not known. Start connecting again.")
    if used:
        reason = "replayed" if first_answer == answer else "used"
        return OAuthStateError(reason, "This sign-in link has already been used.")
    if expires_at is None or expires_at <= now:
        return OAuthStateError("expired", "This sign-in link has expired. Start connecting again.")
    return None


class OAuthStates:
    """The ``oauth_states`` table. Each write is its own transaction."""

    def __init__(self, database: Database) -> None:
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
        async with self._db.transaction() as conn:
            # Forget states long past their expiry so the table stays small.
            await conn.execute(
                "DELETE FROM oauth_states WHERE expires_at < ?", (iso(now - FORGET_AFTER),)
            )
            cursor = await conn.execute(
                "DELETE FROM oauth_states WHERE rowid IN (SELECT rowid FROM oauth_states "
                "WHERE account_id = ? AND used_at IS NULL AND expires_at > ? "
                "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                (account_id, iso(now), MAX_PENDING - 1),
            )
            dropped = max(cursor.rowcount, 0)
            await conn.execute(
                "INSERT INTO oauth_states (state_hash, account_id, created_at, expires_at, "
                "code_verifier, allow_realm_change) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    state_hash,
                    account_id,
                    iso(now),
                    iso(now + ttl),
                    verifier,
                    int(allow_realm_change),
                ),
            )
            return dropped

    async def consume(
        self, state: str, answer: str, *, now: datetime, cipher: Cipher
    ) -> ClaimedState:
        """Mark ``state`` used by ``answer`` (an :func:`answer_hash`) and return its claim.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired``,
        ``replayed`` (used before, by this same answer) or ``used`` (used
        before, by another answer); a failed check changes nothing.
        """
        state_hash = sha256_hex(state)
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "SELECT account_id, expires_at, used_at, answer_hash, code_verifier, "
                "allow_realm_change FROM oauth_states WHERE state_hash = ?",
                (state_hash,),
            )
            row = await cursor.fetchone()
            refused = refusal(
                found=row is not None,
                used=row is not None and row["used_at"] is not None,
                first_answer=None if row is None else row["answer_hash"],
                answer=answer,
                expires_at=None if row is None else parse_iso(row["expires_at"]),
                now=now,
            )
            if refused is not None:
                raise refused
            assert row is not None  # refusal() refuses a state not found
            verifier = row["code_verifier"]
            if verifier is not None:
                verifier = open_verifier(cipher, verifier, state_hash)
            await conn.execute(
                "UPDATE oauth_states SET used_at = ?, answer_hash = ? WHERE state_hash = ?",
                (iso(now), answer, state_hash),
            )
            return ClaimedState(
                account_id=str(row["account_id"]),
                allow_realm_change=bool(row["allow_realm_change"]),
                code_verifier=verifier,
            )

    async def finish(self, state: str, outcome: str) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(
                "UPDATE oauth_states SET outcome = ? WHERE state_hash = ?",
                (outcome, sha256_hex(state)),
            )

    async def get(self, state: str) -> StateRecord | None:
        row = await self._db.fetchone(
            "SELECT account_id, outcome FROM oauth_states WHERE state_hash = ?",
            (sha256_hex(state),),
        )
        if row is None:
            return None
        return StateRecord(account_id=row["account_id"], outcome=row["outcome"])
