"""Credentials that replace what is stored on purpose: a connection, a reconnect, an import.

Unlike a refresh, these writes are no compare-and-swap: they run in a transaction
the caller holds, and the credentials they bring win over whatever the row held.
The row keeps its identity (``id``, ``created_at``) and when it last failed
(``last_failure_at``, history the status page shows); its ``version`` moves on.
"""

from __future__ import annotations

from dataclasses import replace

import aiosqlite

from qbo_daemon.core.models import Account, parse_iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.rows import (
    CONNECTION_COLUMNS,
    INSERT_ACCOUNT,
    INSERT_COLUMNS,
    UPDATE_CONNECTION,
    account_values,
)


async def upsert_account(conn: aiosqlite.Connection, cipher: Cipher, account: Account) -> Account:
    """Store ``account`` as the row of its ``account_id``, creating it if new; in a transaction."""
    cursor = await conn.execute(
        "SELECT id, version, created_at, last_failure_at FROM accounts WHERE account_id = ?",
        (account.account_id,),
    )
    existing = await cursor.fetchone()
    if existing is not None:
        stored = replace(
            account,
            id=existing["id"],
            version=existing["version"] + 1,
            created_at=parse_iso(existing["created_at"]) or account.created_at,
            last_failure_at=parse_iso(existing["last_failure_at"]),
        )
        # The transaction holds the row: the version read above is still the row's.
        await conn.execute(
            UPDATE_CONNECTION,
            (
                *account_values(cipher, stored, CONNECTION_COLUMNS),
                account.account_id,
                existing["version"],
            ),
        )
        return stored
    stored = replace(account, version=1)
    cursor = await conn.execute(INSERT_ACCOUNT, account_values(cipher, stored, INSERT_COLUMNS))
    return replace(stored, id=cursor.lastrowid or 0)
