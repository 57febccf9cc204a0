"""Credentials that replace what is stored on purpose: a connection, a reconnect, an import.

Unlike a refresh, these writes are no compare-and-swap: they run in a transaction
the caller holds, and the credentials they bring win over whatever the row held.
The row keeps its identity (``id``, ``created_at``) and when it last failed
(``last_failure_at``, history the status page shows); its ``version`` moves on.

An import is prepared (its rows encrypted, off the event loop) by
:func:`prepare_import`, then written by :func:`write_import` inside one
transaction on the writer's thread: whether an account exists is read in that
same transaction, so the check and the write cannot be split by another writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiosqlite

from qbo_daemon.core.models import Account, parse_iso
from qbo_daemon.core.threads import yielding
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import Imported
from qbo_daemon.store.rows import (
    CONNECTION_COLUMNS,
    INSERT_ACCOUNT,
    INSERT_COLUMNS,
    SQLITE_FORMS,
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
                *account_values(cipher, stored, CONNECTION_COLUMNS, forms=SQLITE_FORMS),
                account.account_id,
                existing["version"],
            ),
        )
        return stored
    stored = replace(account, version=1)
    cursor = await conn.execute(
        INSERT_ACCOUNT, account_values(cipher, stored, INSERT_COLUMNS, forms=SQLITE_FORMS)
    )
    return replace(stored, id=cursor.lastrowid or 0)


@dataclass(frozen=True, slots=True)
class PreparedImport:
    """One account ready to write: the values of a new row, and of a replacing update."""

    account: Account
    insert: tuple[Any, ...]  # the parameters of INSERT_ACCOUNT (version 1)
    update: tuple[Any, ...]  # the values of UPDATE_CONNECTION's SET (the version is set later)


_VERSION = CONNECTION_COLUMNS.index("version")


def prepare_import(cipher: Cipher, accounts: Sequence[Account]) -> list[PreparedImport]:
    """Each account's encrypted values; pure CPU work, safe on a worker thread."""
    prepared = []
    for account in yielding(accounts):  # a worker thread: the event loop keeps its turns
        new = replace(account, version=1)
        prepared.append(
            PreparedImport(
                new,
                account_values(cipher, new, INSERT_COLUMNS, forms=SQLITE_FORMS),
                account_values(cipher, new, CONNECTION_COLUMNS, forms=SQLITE_FORMS),
            )
        )
    return prepared


def write_import(
    db: sqlite3.Connection, prepared: Sequence[PreparedImport], *, replace_existing: bool
) -> list[Imported]:
    """Store prepared accounts inside the caller's transaction, on the writer's thread.

    An account that exists is replaced when ``replace_existing`` (keeping its
    identity and ``last_failure_at``, like :func:`upsert_account`), else left as it is.
    """
    done = []
    for item in yielding(prepared):  # the writer's thread: the event loop keeps its turns
        account = item.account
        found = db.execute(
            "SELECT id, version, created_at, last_failure_at FROM accounts WHERE account_id = ?",
            (account.account_id,),
        ).fetchone()
        if found is None:
            cursor = db.execute(INSERT_ACCOUNT, item.insert)
            done.append(
                Imported(account.account_id, False, replace(account, id=cursor.lastrowid or 0))
            )
        elif replace_existing:
            row_id, version, created_at, last_failure_at = found[0], found[1], found[2], found[3]
            values = list(item.update)
            values[_VERSION] = version + 1
            db.execute(UPDATE_CONNECTION, (*values, account.account_id, version))
            stored = replace(
                account,
                id=row_id,
                version=version + 1,
                created_at=parse_iso(created_at) or account.created_at,
                last_failure_at=parse_iso(last_failure_at),
            )
            done.append(Imported(account.account_id, True, stored))
        else:
            done.append(Imported(account.account_id, True, None))
    return done
