"""Rows of the PostgreSQL tables as values, and back. No I/O.

The columns are SQLite's, from its one list (``store.rows.ACCOUNT_COLUMNS``).
The secrets are encrypted exactly as on SQLite (``store/rows.py``): the same
:class:`Cipher`, the same associated data (table ``accounts``, the column,
the ``account_id``, the key id), so a ciphertext copies between the two
databases unchanged; so is ``realm_digest``, the keyed digest that finds the
accounts of one company. Times are ``timestamptz``: aware UTC datetimes both ways.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from qbo_daemon.core.models import Account, AccountStatus, utc
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import AccountChange, Attempt, ScheduleEntry
from qbo_daemon.store.rows import ACCOUNT_COLUMNS, SECRET_COLUMNS, realm_digest

# Written with realm_id, under the same key (store.rows.realm_digest); no Account field.
DERIVED_COLUMNS = ("realm_digest",)
# What a write of the credentials sets: all but the row's identity and its version.
TOKEN_COLUMNS = tuple(c for c in ACCOUNT_COLUMNS[3:] if c != "version")
# What a failure note sets: the credentials (and the key they are under) stay.
NOTE_COLUMNS = tuple(
    c for c in TOKEN_COLUMNS if c not in (*SECRET_COLUMNS, *DERIVED_COLUMNS, "key_id")
)
# What a connection or an import sets on an existing row: when it last failed stays.
CONNECTION_COLUMNS = tuple(c for c in TOKEN_COLUMNS if c != "last_failure_at")
# What a new row gets: all but the surrogate key.
INSERT_COLUMNS = ACCOUNT_COLUMNS[1:]
SELECT_ACCOUNTS = f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM accounts"
ATTEMPT_COLUMNS = ("account_id", "started_at", "outcome", "duration_ms", "intuit_tid", "error")
# What every node hears of a committed change (store.port.AccountChange): no secrets.
# ``$origin`` is replaced by the parameter that names the writing node.
CHANGE_PAYLOAD = (
    "json_build_object('a', account_id, 'v', version, 's', status, "
    "'r', extract(epoch from reconnect_token_at), 'f', failure_count, "
    "'l', extract(epoch from last_failure_at), 'o', $origin::text)::text"
)
SCHEDULE_COLUMNS = (
    "id, account_id, status, reconnect_token_at, token_expires_at, "
    "refresh_token_expires_at, refresh_token_hard_expires_at"
)


def account_values(cipher: Cipher, account: Account, columns: Iterable[str]) -> tuple[Any, ...]:
    """The values of ``columns`` for ``account``: secrets encrypted under the primary key."""
    values: list[Any] = []
    for column in columns:
        value = getattr(account, column, None)
        if column in SECRET_COLUMNS:
            values.append(
                None
                if value is None
                else cipher.encrypt(
                    value, table="accounts", column=column, row_key=account.account_id
                )
            )
        elif column == "realm_digest":
            values.append(realm_digest(cipher, account.realm_id))
        elif column == "key_id":
            values.append(cipher.primary_key_id)
        elif column == "status":
            values.append(account.status.value)
        elif column.endswith("_at"):
            values.append(None if value is None else utc(value))
        else:
            values.append(value)
    return tuple(values)


def account_from_record(cipher: Cipher, record: asyncpg.Record, *, tokens: bool) -> Account:
    """The account of a row of :data:`ACCOUNT_COLUMNS`; without ``tokens`` they stay None."""
    return Account(
        id=record["id"],
        account_id=record["account_id"],
        status=AccountStatus(record["status"]),
        realm_id=_decrypt(cipher, record, "realm_id"),
        access_token=_decrypt(cipher, record, "access_token") if tokens else None,
        refresh_token=_decrypt(cipher, record, "refresh_token") if tokens else None,
        token_expires_at=record["token_expires_at"],
        reconnect_token_at=record["reconnect_token_at"],
        refresh_token_expires_at=record["refresh_token_expires_at"],
        refresh_token_hard_expires_at=record["refresh_token_hard_expires_at"],
        failure_count=record["failure_count"],
        last_error=record["last_error"],
        last_refreshed_at=record["last_refreshed_at"],
        version=record["version"],
        created_at=record["created_at"],
        updated_at=record["updated_at"],
        realm_verified=record["realm_verified"],
        last_failure_at=record["last_failure_at"],
    )


def _decrypt(cipher: Cipher, record: asyncpg.Record, column: str) -> str | None:
    value = record[column]
    if value is None:
        return None
    return cipher.decrypt(value, table="accounts", column=column, row_key=record["account_id"])


def schedule_entry(record: asyncpg.Record) -> ScheduleEntry | None:
    """The entry of a row of :data:`SCHEDULE_COLUMNS`; None without a token expiry."""
    token_expires_at = record["token_expires_at"]
    due = record["reconnect_token_at"] or token_expires_at
    if token_expires_at is None or due is None:
        return None
    return ScheduleEntry(
        account_id=record["account_id"],
        status=AccountStatus(record["status"]),
        reconnect_token_at=due,
        token_expires_at=token_expires_at,
        refresh_token_expires_at=record["refresh_token_expires_at"],
        refresh_token_hard_expires_at=record["refresh_token_hard_expires_at"],
    )


def account_change(payload: str) -> AccountChange | None:
    """The change a notification announces; None for a payload this version cannot read."""
    try:
        data = json.loads(payload)
        return AccountChange(
            account_id=str(data["a"]),
            version=int(data["v"]),
            status=AccountStatus(data["s"]),
            reconnect_token_at=_epoch(data["r"]),
            failure_count=int(data["f"]),
            last_failure_at=_epoch(data["l"]),
            origin=None if data["o"] is None else str(data["o"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _epoch(value: object) -> datetime | None:
    if value is None:
        return None
    return datetime.fromtimestamp(float(str(value)), UTC)


def attempt_values(attempt: Attempt) -> tuple[Any, ...]:
    """The values of :data:`ATTEMPT_COLUMNS`."""
    return (
        attempt.account_id,
        utc(attempt.started_at),
        attempt.outcome,
        round(attempt.duration_ms, 3),
        attempt.intuit_tid,
        attempt.error,
    )


def attempt_from_record(record: asyncpg.Record) -> Attempt:
    return Attempt(
        account_id=record["account_id"],
        started_at=record["started_at"],
        outcome=record["outcome"],
        duration_ms=record["duration_ms"],
        intuit_tid=record["intuit_tid"],
        error=record["error"],
    )
