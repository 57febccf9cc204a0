"""Credentials that replace what is stored on purpose: a connection, a reconnect, an import.

Unlike a refresh, these writes are no compare-and-swap: they run in a transaction
the caller holds, and the credentials they bring win over whatever the row held.

An import is prepared (validated rows encrypted, off the event loop) by
:func:`prepare_import`, then written by :func:`write_import` inside one
transaction on the writer's thread: whether an account exists is read in that
same transaction, so the check and the write cannot be split by another writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import aiosqlite

from qbo_daemon.core.models import Account, AccountStatus, TokenSet, iso, parse_iso, reconnect_at
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.rows import encrypt_secrets, realm_digest

# The bulk insert of new accounts; its parameters are :func:`new_account_rows`.
NEW_ACCOUNT_INSERT = (
    "INSERT INTO accounts (status, realm_id, access_token, refresh_token, key_id, "
    "token_expires_at, reconnect_token_at, refresh_token_expires_at, "
    "last_refreshed_at, updated_at, account_id, created_at, realm_digest, version) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"
)


@dataclass(frozen=True, slots=True)
class ImportItem:
    """An existing connection brought in from elsewhere."""

    account_id: str
    realm_id: str
    refresh_token: str
    access_token: str | None = None
    token_expires_at: datetime | None = None
    refresh_token_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Imported:
    """What an import did with one item."""

    account_id: str
    existed: bool  # the account was there when the write's transaction read it
    account: Account | None  # as stored; None when it existed and was not to be replaced


@dataclass(frozen=True, slots=True)
class PreparedImport:
    """One item ready to write: its account as it will be stored, and the insert's parameters."""

    account: Account
    row: tuple[Any, ...]  # the parameters of NEW_ACCOUNT_INSERT, secrets encrypted


# An existing account replaced by an import: the same values as a new row's, in the
# order of NEW_ACCOUNT_INSERT's first ten parameters, then the account_id.
_IMPORT_UPDATE = (
    "UPDATE accounts SET status = ?, realm_id = ?, access_token = ?, refresh_token = ?, "
    "key_id = ?, token_expires_at = ?, reconnect_token_at = ?, refresh_token_expires_at = ?, "
    "last_refreshed_at = ?, updated_at = ?, refresh_token_hard_expires_at = NULL, "
    "failure_count = 0, last_error = NULL, version = version + 1 WHERE account_id = ?"
)


def imported_tokens(item: ImportItem, now: datetime) -> TokenSet:
    """An imported connection's tokens; an access token without a future expiry is dead."""
    expires = item.token_expires_at
    access = item.access_token
    if access is None or expires is None or expires <= now:
        access, expires = "", now
    return TokenSet(
        access_token=access,
        refresh_token=item.refresh_token,
        obtained_at=now,
        token_expires_at=expires,
        refresh_token_expires_at=item.refresh_token_expires_at or now + timedelta(days=100),
    )


def new_account_rows(
    cipher: Cipher, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
) -> list[tuple[Any, ...]]:
    """The parameters of :data:`NEW_ACCOUNT_INSERT` for each item, secrets encrypted."""
    key_id = cipher.primary_key_id
    rows = []
    for item in items:
        tokens = imported_tokens(item, now)
        secrets = {
            "realm_id": item.realm_id,
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
        }
        enc = {
            column: cipher.encrypt(value, table="accounts", column=column, row_key=item.account_id)
            for column, value in secrets.items()
        }
        due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
        rows.append(
            (
                AccountStatus.ACTIVE.value,
                enc["realm_id"],
                enc["access_token"],
                enc["refresh_token"],
                key_id,
                iso(tokens.token_expires_at),
                iso(due),
                iso(tokens.refresh_token_expires_at),
                iso(now),
                iso(now),
                item.account_id,
                iso(now),
                realm_digest(cipher, item.realm_id),
            )
        )
    return rows


def prepare_import(
    cipher: Cipher, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
) -> list[PreparedImport]:
    """Each item's account and encrypted row; pure CPU work, safe on a worker thread."""
    prepared = []
    for item, row in zip(items, new_account_rows(cipher, items, lead=lead, now=now), strict=True):
        tokens = imported_tokens(item, now)
        account = Account(
            id=0,
            account_id=item.account_id,
            status=AccountStatus.ACTIVE,
            realm_id=item.realm_id,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=tokens.token_expires_at,
            reconnect_token_at=reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at),
            refresh_token_expires_at=tokens.refresh_token_expires_at,
            refresh_token_hard_expires_at=None,
            failure_count=0,
            last_error=None,
            last_refreshed_at=now,
            version=1,
            created_at=now,
            updated_at=now,
        )
        prepared.append(PreparedImport(account, row))
    return prepared


def write_import(
    db: sqlite3.Connection, prepared: Sequence[PreparedImport], *, replace_existing: bool
) -> list[Imported]:
    """Store prepared items inside the caller's transaction, on the writer's thread.

    An account that exists is replaced when ``replace_existing``, else left as it is.
    """
    done = []
    for item in prepared:
        account = item.account
        found = db.execute(
            "SELECT id, version, created_at FROM accounts WHERE account_id = ?",
            (account.account_id,),
        ).fetchone()
        if found is None:
            cursor = db.execute(NEW_ACCOUNT_INSERT, item.row)
            done.append(
                Imported(account.account_id, False, replace(account, id=cursor.lastrowid or 0))
            )
        elif replace_existing:
            db.execute(_IMPORT_UPDATE, (*item.row[:10], account.account_id))
            row_id, version, created_at = found[0], found[1], found[2]
            stored = replace(
                account,
                id=row_id,
                version=version + 1,
                created_at=parse_iso(created_at) or account.created_at,
            )
            done.append(Imported(account.account_id, True, stored))
        else:
            done.append(Imported(account.account_id, True, None))
    return done


async def upsert_account(
    conn: aiosqlite.Connection,
    cipher: Cipher,
    account_id: str,
    realm_id: str,
    tokens: TokenSet,
    *,
    lead: timedelta,
    now: datetime,
    realm_verified: bool = True,
) -> Account:
    """Store these credentials as the account's, creating it if new; inside a transaction.

    ``realm_verified`` is False for a connection whose company Intuit could not
    confirm yet (imports are an operator's word and count as confirmed).
    """
    cursor = await conn.execute(
        "SELECT id, version, created_at FROM accounts WHERE account_id = ?", (account_id,)
    )
    existing = await cursor.fetchone()
    due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
    account = Account(
        id=existing["id"] if existing else 0,
        account_id=account_id,
        status=AccountStatus.ACTIVE,
        realm_id=realm_id,
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        token_expires_at=tokens.token_expires_at,
        reconnect_token_at=due,
        refresh_token_expires_at=tokens.refresh_token_expires_at,
        refresh_token_hard_expires_at=tokens.refresh_token_hard_expires_at,
        failure_count=0,
        last_error=None,
        last_refreshed_at=now,
        version=existing["version"] + 1 if existing else 1,
        created_at=parse_iso(existing["created_at"]) or now if existing else now,
        updated_at=now,
        realm_verified=realm_verified,
    )
    enc = encrypt_secrets(cipher, account)
    values = (
        account.status.value,
        enc["realm_id"],
        enc["access_token"],
        enc["refresh_token"],
        cipher.primary_key_id,
        iso(account.token_expires_at),
        iso(due),
        iso(account.refresh_token_expires_at),
        iso(account.refresh_token_hard_expires_at),
        iso(now),
        iso(now),
        enc["realm_digest"],
        int(realm_verified),
    )
    if existing:
        await conn.execute(
            "UPDATE accounts SET status = ?, realm_id = ?, access_token = ?, "
            "refresh_token = ?, key_id = ?, token_expires_at = ?, reconnect_token_at = ?, "
            "refresh_token_expires_at = ?, refresh_token_hard_expires_at = ?, "
            "last_refreshed_at = ?, updated_at = ?, realm_digest = ?, realm_verified = ?, "
            "failure_count = 0, last_error = NULL, version = version + 1 WHERE account_id = ?",
            (*values, account_id),
        )
        return account
    cursor = await conn.execute(
        "INSERT INTO accounts (status, realm_id, access_token, refresh_token, key_id, "
        "token_expires_at, reconnect_token_at, refresh_token_expires_at, "
        "refresh_token_hard_expires_at, last_refreshed_at, updated_at, realm_digest, "
        "realm_verified, account_id, created_at, version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        (*values, account_id, iso(now)),
    )
    return replace(account, id=cursor.lastrowid or 0)
