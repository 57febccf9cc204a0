"""Rows of the ``accounts`` and ``refresh_attempts`` tables as values, and back.

Secrets (realm id, access and refresh token) are encrypted with associated
data naming the table, column and ``account_id``, so a ciphertext copied to
another row does not decrypt. No I/O here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from qbo_daemon.core.models import Account, AccountStatus, iso, parse_iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.sqlite import Statement

ACCOUNT_COLUMNS = (
    "id, account_id, status, realm_id, access_token, refresh_token, key_id, token_expires_at, "
    "reconnect_token_at, refresh_token_expires_at, refresh_token_hard_expires_at, failure_count, "
    "last_error, last_refreshed_at, version, created_at, updated_at, realm_verified"
)
# Keeps digests of realm ids apart from any other digest (store.crypto.Cipher.digest).
REALM_DIGEST_PURPOSE = "accounts.realm_id"


@dataclass(frozen=True, slots=True)
class ScheduleEntry:
    """What the scheduler needs of an account at start-up: times, no secrets."""

    account_id: str
    status: AccountStatus
    reconnect_token_at: datetime
    token_expires_at: datetime
    refresh_token_expires_at: datetime | None
    refresh_token_hard_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One refresh attempt, for the append-only attempts table."""

    account_id: str
    started_at: datetime
    outcome: str
    duration_ms: float
    intuit_tid: str | None = None
    error: str | None = None


def encrypt_secrets(cipher: Cipher, account: Account) -> dict[str, str | None]:
    """The account's secret columns as stored: encrypted, or None where the value is.

    Also ``realm_digest``, written with ``realm_id`` under the same key.
    """
    values = {
        "realm_id": account.realm_id,
        "access_token": account.access_token,
        "refresh_token": account.refresh_token,
    }
    stored = {
        column: None
        if value is None
        else cipher.encrypt(value, table="accounts", column=column, row_key=account.account_id)
        for column, value in values.items()
    }
    stored["realm_digest"] = realm_digest(cipher, account.realm_id)
    return stored


def realm_digest(cipher: Cipher, realm_id: str | None) -> str | None:
    """The keyed digest that finds the accounts of one company without decrypting them."""
    return None if realm_id is None else cipher.digest(realm_id, purpose=REALM_DIGEST_PURPOSE)


def account_from_row(cipher: Cipher, row: sqlite3.Row, *, tokens: bool) -> Account:
    """The account of a row of :data:`ACCOUNT_COLUMNS`; without ``tokens`` they stay None."""
    return Account(
        id=row["id"],
        account_id=row["account_id"],
        status=AccountStatus(row["status"]),
        realm_id=_decrypt(cipher, row, "realm_id"),
        access_token=_decrypt(cipher, row, "access_token") if tokens else None,
        refresh_token=_decrypt(cipher, row, "refresh_token") if tokens else None,
        token_expires_at=parse_iso(row["token_expires_at"]),
        reconnect_token_at=parse_iso(row["reconnect_token_at"]),
        refresh_token_expires_at=parse_iso(row["refresh_token_expires_at"]),
        refresh_token_hard_expires_at=parse_iso(row["refresh_token_hard_expires_at"]),
        failure_count=row["failure_count"],
        last_error=row["last_error"],
        last_refreshed_at=parse_iso(row["last_refreshed_at"]),
        version=row["version"],
        created_at=parse_iso(row["created_at"]) or datetime.min,
        updated_at=parse_iso(row["updated_at"]) or datetime.min,
        realm_verified=bool(row["realm_verified"]),
    )


def _decrypt(cipher: Cipher, row: sqlite3.Row, column: str) -> str | None:
    value = row[column]
    if value is None:
        return None
    return cipher.decrypt(value, table="accounts", column=column, row_key=row["account_id"])


def schedule_entries_from(rows: Iterable[sqlite3.Row]) -> list[ScheduleEntry]:
    """The entries of rows that have a token expiry; rows without one are skipped."""
    entries = []
    for row in rows:
        token_expires_at = parse_iso(row["token_expires_at"])
        due = parse_iso(row["reconnect_token_at"]) or token_expires_at
        if token_expires_at is None or due is None:
            continue
        entries.append(
            ScheduleEntry(
                account_id=row["account_id"],
                status=AccountStatus(row["status"]),
                reconnect_token_at=due,
                token_expires_at=token_expires_at,
                refresh_token_expires_at=parse_iso(row["refresh_token_expires_at"]),
                refresh_token_hard_expires_at=parse_iso(row["refresh_token_hard_expires_at"]),
            )
        )
    return entries


def attempt_statements(attempt: Attempt | None) -> list[Statement]:
    """The insert of ``attempt``, to write with its account's update; none for None."""
    if attempt is None:
        return []
    return [
        (
            "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms, "
            "intuit_tid, error) VALUES (?, ?, ?, ?, ?, ?)",
            (
                attempt.account_id,
                iso(attempt.started_at),
                attempt.outcome,
                round(attempt.duration_ms, 3),
                attempt.intuit_tid,
                attempt.error,
            ),
        )
    ]


def attempt_from_row(row: sqlite3.Row) -> Attempt:
    return Attempt(
        account_id=row["account_id"],
        started_at=parse_iso(row["started_at"]) or datetime.min,
        outcome=row["outcome"],
        duration_ms=row["duration_ms"],
        intuit_tid=row["intuit_tid"],
        error=row["error"],
    )
