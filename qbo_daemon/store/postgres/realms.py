"""Which company an account may be connected to, on PostgreSQL: SQLite's rules in the write.

The rules and their errors are ``store/realms.py``'s (:func:`judge_realm`);
this module reads the rows they need inside the connecting transaction. On
SQLite one writer at a time makes the check and the write atomic; here,
with several daemons, every checked connection first takes one
transaction-level advisory lock, so two callbacks for one company (on any
nodes) cannot both pass the check. Callbacks are rare: serialising them costs
nothing a user sees.
"""

from __future__ import annotations

from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.postgres.database import Conn
from qbo_daemon.store.realms import RealmPolicy, judge_realm
from qbo_daemon.store.rows import REALM_DIGEST_PURPOSE

# The advisory lock key of checked connections: "qbor" in ASCII.
REALM_LOCK = 0x71626F72


async def check_realm(
    conn: Conn, cipher: Cipher, account_id: str, realm_id: str, policy: RealmPolicy
) -> str | None:
    """Raise :class:`RealmConflictError` if the rules refuse; else the account's previous
    realm when this connection changes it. Inside the caller's transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", REALM_LOCK)
    holder = None
    if not policy.allow_shared:
        holder = await conn.fetchval(
            "SELECT account_id FROM accounts WHERE realm_digest = ANY($1::text[]) "
            "AND account_id <> $2 AND status <> 'disconnected' LIMIT 1",
            list(cipher.digests(realm_id, purpose=REALM_DIGEST_PURPOSE)),
            account_id,
        )
    stored = await conn.fetchval("SELECT realm_id FROM accounts WHERE account_id = $1", account_id)
    return judge_realm(
        cipher,
        account_id,
        realm_id,
        policy,
        holder=None if holder is None else str(holder),
        stored_realm=stored,
    )
