"""The one row mapper: accounts and refresh attempts as values, and back.

:data:`ACCOUNT_COLUMNS` is the one list of the ``accounts`` table's columns;
every statement on that table is derived from it, and :func:`account_values`
and :func:`account_from_row` turn an :class:`Account` into column values and
back, for both databases (``migrate-storage`` copies rows without making
accounts of them: ``store/transfer.py``). What the two hold differently
(SQLite keeps instants as ISO text and flags as integers, PostgreSQL as
``timestamptz`` and ``boolean``) is a :class:`StoredForms` value each backend
passes in: :data:`SQLITE_FORMS` here, ``POSTGRES_FORMS`` in ``store/postgres``.

Secrets (realm id, access and refresh token) are encrypted with associated
data naming the table, column and ``account_id``, so a ciphertext copied to
another row does not decrypt. Beside the realm, a keyed digest of it
(``realm_digest``, under the same key) finds the accounts of one company
without decrypting them (``store.realms``). No I/O here.

A compare-and-swap write need not set every column: the row at the version it
names is the row that was read, so :func:`changed_values` sets only the columns
whose stored value moves (a refresh: the access token and the times, not the
realm or the failure history). That spares the encryptions and digests of
unchanged secrets, and SQLite leaves alone every index on a column the statement
does not set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from qbo_daemon.core.models import Account, AccountStatus, iso, parse_iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import Attempt, ScheduleEntry


class Row(Protocol):
    """A fetched row, read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class StoredForms:
    """How one database holds the values the two hold differently."""

    instant: Callable[[datetime | None], Any]  # an instant (or None) as stored
    read_instant: Callable[[Any], datetime | None]  # a stored instant back, aware UTC
    flag: Callable[[bool], Any]  # a boolean column as stored


# SQLite: ISO 8601 text in UTC with microseconds (text order is time order), 0 and 1.
SQLITE_FORMS = StoredForms(instant=iso, read_instant=parse_iso, flag=int)


# Every column of ``accounts``: identity first, then what writes set.
ACCOUNT_COLUMNS = (
    "id",
    "account_id",
    "created_at",
    "status",
    "realm_id",
    "access_token",
    "refresh_token",
    "key_id",
    "token_expires_at",
    "reconnect_token_at",
    "refresh_token_expires_at",
    "refresh_token_hard_expires_at",
    "failure_count",
    "last_error",
    "last_refreshed_at",
    "version",
    "updated_at",
    "realm_verified",
    "last_failure_at",
    "realm_digest",
)
SECRET_COLUMNS = ("realm_id", "access_token", "refresh_token")
# Written from the realm (and the key) with the secrets, never read back into an Account.
DERIVED_COLUMNS = ("realm_digest",)
# What a write of the credentials sets: all but the row's identity.
TOKEN_COLUMNS = ACCOUNT_COLUMNS[3:]
# What a failure note sets: the credentials (and the key they are under) stay.
NOTE_COLUMNS = tuple(
    c for c in TOKEN_COLUMNS if c not in (*SECRET_COLUMNS, *DERIVED_COLUMNS, "key_id")
)
# What a connection or an import sets on an existing row: when it last failed stays
# (it is history, shown on the status page), everything else is the new connection's.
CONNECTION_COLUMNS = tuple(c for c in TOKEN_COLUMNS if c != "last_failure_at")
# What a new row gets: all but the surrogate key.
INSERT_COLUMNS = ACCOUNT_COLUMNS[1:]


@functools.cache
def update_statement(columns: tuple[str, ...]) -> str:
    """The compare-and-swap ``UPDATE`` that sets ``columns`` (a tuple of ACCOUNT_COLUMNS).

    Its parameters are ``account_values(...)`` of those columns, then ``account_id``
    and the version read.
    """
    assignments = ", ".join(f"{column} = ?" for column in columns)
    return f"UPDATE accounts SET {assignments} WHERE account_id = ? AND version = ?"


SELECT_ACCOUNTS = f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM accounts"
UPDATE_TOKENS = update_statement(TOKEN_COLUMNS)
UPDATE_NOTE = update_statement(NOTE_COLUMNS)
UPDATE_CONNECTION = update_statement(CONNECTION_COLUMNS)
INSERT_ACCOUNT = (
    f"INSERT INTO accounts ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(INSERT_COLUMNS))})"
)
# Keeps digests of realm ids apart from any other digest (store.crypto.Cipher.digest).
REALM_DIGEST_PURPOSE = "accounts.realm_id"
# The columns of ``refresh_attempts`` a write sets, in the order of attempt_values.
ATTEMPT_COLUMNS = ("account_id", "started_at", "outcome", "duration_ms", "intuit_tid", "error")
INSERT_ATTEMPT = (
    f"INSERT INTO refresh_attempts ({', '.join(ATTEMPT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(ATTEMPT_COLUMNS))})"
)


def account_values(
    cipher: Cipher | None, account: Account, columns: Iterable[str], *, forms: StoredForms
) -> tuple[Any, ...]:
    """The values of ``columns`` for ``account``, secrets encrypted under the primary key.

    ``cipher`` may be None only when ``columns`` holds no secret.
    """
    return tuple(_value(cipher, account, column, forms) for column in columns)


def changed_values(
    cipher: Cipher,
    account: Account,
    columns: tuple[str, ...],
    row: Row,
    read: Account,
    *,
    forms: StoredForms,
) -> tuple[tuple[str, ...], tuple[Any, ...]] | None:
    """The columns of ``columns`` whose value ``account`` changes, and their stored values.

    ``row`` is the stored row a compare-and-swap write replaces (as read, at the
    version the write names) and ``read`` the account made of it. A column is set
    when its value in ``account`` differs from ``read``'s (a secret's plaintext,
    an instant, ...): only then is a secret encrypted, and the realm's digest
    follows the realm. None when the row's secrets are not under the primary key:
    then every column is written, so that they all end up under it.
    """
    stored_key = row["key_id"]
    if "key_id" in columns and stored_key is not None and stored_key != cipher.primary_key_id:
        return None
    changed: list[str] = []
    values: list[Any] = []
    for column in columns:
        if column in _DERIVED_FROM:
            if stored_key is not None and (column == "key_id" or account.realm_id == read.realm_id):
                continue
            values.append(_value(cipher, account, column, forms))
        else:
            value = getattr(account, column)
            if value == getattr(read, column):
                continue
            values.append(_field_value(cipher, account, column, value, forms))
        changed.append(column)
    return tuple(changed), tuple(values)


# Columns that are not an Account's field: the key the secrets are under, and the digest
# of the realm (rewritten with it).
_DERIVED_FROM = frozenset({"key_id", "realm_digest"})


def _value(cipher: Cipher | None, account: Account, column: str, forms: StoredForms) -> Any:
    if column == "key_id":
        assert cipher is not None
        return cipher.primary_key_id
    if column == "realm_digest":
        assert cipher is not None
        return realm_digest(cipher, account.realm_id)
    return _field_value(cipher, account, column, getattr(account, column), forms)


def _field_value(
    cipher: Cipher | None, account: Account, column: str, value: Any, forms: StoredForms
) -> Any:
    """The stored form of ``value``, the account's field named ``column``."""
    if column in _TIMES:
        return forms.instant(value)
    if column in _SECRETS:
        assert cipher is not None, column
        if value is None:
            return None
        return cipher.encrypt(value, table="accounts", column=column, row_key=account.account_id)
    if column == "status":
        return value.value
    if column == "realm_verified":
        return forms.flag(value)
    return value


_SECRETS = frozenset(SECRET_COLUMNS)


_TIMES = frozenset(
    {
        "created_at",
        "token_expires_at",
        "reconnect_token_at",
        "refresh_token_expires_at",
        "refresh_token_hard_expires_at",
        "last_refreshed_at",
        "updated_at",
        "last_failure_at",
    }
)


def realm_digest(cipher: Cipher, realm_id: str | None) -> str | None:
    """The keyed digest that finds the accounts of one company without decrypting them."""
    return None if realm_id is None else cipher.digest(realm_id, purpose=REALM_DIGEST_PURPOSE)


def account_from_row(cipher: Cipher, row: Row, *, tokens: bool, forms: StoredForms) -> Account:
    """The account of a row of :data:`ACCOUNT_COLUMNS`; without ``tokens`` they stay None."""
    instant = forms.read_instant
    return Account(
        id=row["id"],
        account_id=row["account_id"],
        status=AccountStatus(row["status"]),
        realm_id=_decrypt(cipher, row, "realm_id"),
        access_token=_decrypt(cipher, row, "access_token") if tokens else None,
        refresh_token=_decrypt(cipher, row, "refresh_token") if tokens else None,
        token_expires_at=instant(row["token_expires_at"]),
        reconnect_token_at=instant(row["reconnect_token_at"]),
        refresh_token_expires_at=instant(row["refresh_token_expires_at"]),
        refresh_token_hard_expires_at=instant(row["refresh_token_hard_expires_at"]),
        failure_count=row["failure_count"],
        last_error=row["last_error"],
        last_refreshed_at=instant(row["last_refreshed_at"]),
        version=row["version"],
        created_at=instant(row["created_at"]) or datetime.min,
        updated_at=instant(row["updated_at"]) or datetime.min,
        realm_verified=bool(row["realm_verified"]),
        last_failure_at=instant(row["last_failure_at"]),
    )


def _decrypt(cipher: Cipher, row: Row, column: str) -> str | None:
    value = row[column]
    if value is None:
        return None
    return cipher.decrypt(value, table="accounts", column=column, row_key=row["account_id"])


def schedule_entries_from(rows: Iterable[Row], *, forms: StoredForms) -> list[ScheduleEntry]:
    """The entries of rows that have a token expiry; rows without one are skipped.

    A row holds the columns ``account_id``, ``status`` and the four expiry instants.
    """
    instant = forms.read_instant
    entries = []
    for row in rows:
        token_expires_at = instant(row["token_expires_at"])
        due = instant(row["reconnect_token_at"]) or token_expires_at
        if token_expires_at is None or due is None:
            continue
        entries.append(
            ScheduleEntry(
                account_id=row["account_id"],
                status=AccountStatus(row["status"]),
                reconnect_token_at=due,
                token_expires_at=token_expires_at,
                refresh_token_expires_at=instant(row["refresh_token_expires_at"]),
                refresh_token_hard_expires_at=instant(row["refresh_token_hard_expires_at"]),
            )
        )
    return entries


def attempt_values(attempt: Attempt, *, forms: StoredForms) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT_ATTEMPT` (its columns, in that order)."""
    return (
        attempt.account_id,
        forms.instant(attempt.started_at),
        attempt.outcome,
        round(attempt.duration_ms, 3),
        attempt.intuit_tid,
        attempt.error,
    )


def attempt_from_row(row: Row, *, forms: StoredForms) -> Attempt:
    """An attempt of a row of ``refresh_attempts``."""
    return Attempt(
        account_id=row["account_id"],
        started_at=forms.read_instant(row["started_at"]) or datetime.min,
        outcome=row["outcome"],
        duration_ms=row["duration_ms"],
        intuit_tid=row["intuit_tid"],
        error=row["error"],
    )
