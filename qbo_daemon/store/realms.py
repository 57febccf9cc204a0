"""Which company an account may be connected to: checked in the transaction that stores it.

Two rules guard a new connection from the callback:

- one company, one account id: a realm another account id holds (any status
  but ``disconnected``) is refused, unless sharing is allowed;
- an account keeps its company: reconnecting it to another realm is refused
  unless the authorization asked for a change.

Accounts are found by their realm through a keyed digest
(:func:`qbo_daemon.store.rows.realm_digest`), since the realm itself is
encrypted with a random nonce. The check runs inside the caller's transaction,
so two callbacks cannot both pass it for one company.
"""

from __future__ import annotations

import aiosqlite

from qbo_daemon.core.errors import RealmConflictError
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import RealmPolicy
from qbo_daemon.store.rows import REALM_DIGEST_PURPOSE

__all__ = ["RealmPolicy", "check_realm"]


async def check_realm(
    conn: aiosqlite.Connection,
    cipher: Cipher,
    account_id: str,
    realm_id: str,
    policy: RealmPolicy,
) -> str | None:
    """Raise :class:`RealmConflictError` if the rules refuse; else the account's previous
    realm when this connection changes it (None when new or the same)."""
    holder = None
    if not policy.allow_shared:
        digests = cipher.digests(realm_id, purpose=REALM_DIGEST_PURPOSE)
        cursor = await conn.execute(
            "SELECT account_id FROM accounts WHERE realm_digest IN "
            f"({', '.join('?' * len(digests))}) AND account_id != ? "
            "AND status != 'disconnected' LIMIT 1",
            (*digests, account_id),
        )
        found = await cursor.fetchone()
        holder = None if found is None else str(found["account_id"])
    cursor = await conn.execute("SELECT realm_id FROM accounts WHERE account_id = ?", (account_id,))
    row = await cursor.fetchone()
    stored = None if row is None else row["realm_id"]
    return judge_realm(cipher, account_id, realm_id, policy, holder=holder, stored_realm=stored)


def judge_realm(
    cipher: Cipher,
    account_id: str,
    realm_id: str,
    policy: RealmPolicy,
    *,
    holder: str | None,
    stored_realm: str | None,
) -> str | None:
    """The rules, once the caller has read the rows (no I/O; both backends use it).

    ``holder``: another account id, not disconnected, holding the realm (looked
    up only when sharing is not allowed); ``stored_realm``: the account's
    ``realm_id`` column as stored (encrypted), None when new. Raises
    :class:`RealmConflictError`, or returns the previous realm when it changes.
    """
    if holder is not None and not policy.allow_shared:
        raise RealmConflictError(
            "shared",
            f"the company is already connected under account id {holder!r} "
            "([callback] allow_shared_realm is false)",
            holder=holder,
        )
    if stored_realm is None:
        return None
    previous = cipher.decrypt(stored_realm, table="accounts", column="realm_id", row_key=account_id)
    if previous == realm_id:
        return None
    if not policy.allow_change:
        raise RealmConflictError(
            "changed",
            "the account is connected to another company, and its authorize-url request "
            'did not ask for a change ({"allow_realm_change": true})',
        )
    return previous
