"""The one row mapper (``store/rows.py``), in the stored forms of both databases.

SQLite and PostgreSQL hold instants and flags differently; everything else (the
column list, the encryption of the secrets, the realm's digest) is one code path.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from qbo_daemon.core.models import Account, AccountStatus
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import Attempt, ScheduleEntry
from qbo_daemon.store.postgres.rows import POSTGRES_FORMS
from qbo_daemon.store.rows import (
    ACCOUNT_COLUMNS,
    ATTEMPT_COLUMNS,
    REALM_DIGEST_PURPOSE,
    SQLITE_FORMS,
    StoredForms,
    account_from_row,
    account_values,
    attempt_from_row,
    attempt_values,
    schedule_entries_from,
)

NOW = datetime(2026, 11, 30, 5, 30, 0, 123456, tzinfo=UTC)
REALM = "9130350000000001"
ACCOUNT = Account(
    id=7,
    account_id="acme",
    status=AccountStatus.ACTIVE,
    realm_id=REALM,
    access_token="eyJ.access.token",
    refresh_token="AB11.refresh.token",
    token_expires_at=NOW + timedelta(hours=1),
    reconnect_token_at=NOW + timedelta(minutes=50),
    refresh_token_expires_at=NOW + timedelta(days=100),
    refresh_token_hard_expires_at=None,
    failure_count=2,
    last_error="Intuit answered HTTP 503",
    last_refreshed_at=NOW - timedelta(seconds=1),
    version=4,
    created_at=NOW - timedelta(days=3),
    updated_at=NOW,
    realm_verified=False,
    last_failure_at=NOW - timedelta(minutes=5),
)


# The other value of every flag and optional field: verified, a hard expiry, no
# failure, no realm or tokens yet.
OTHER = replace(
    ACCOUNT,
    realm_id=None,
    access_token=None,
    refresh_token=None,
    refresh_token_hard_expires_at=NOW + timedelta(days=1000),
    last_error=None,
    last_refreshed_at=None,
    realm_verified=True,
    last_failure_at=None,
)


def stored(cipher: Cipher, forms: StoredForms, account: Account = ACCOUNT) -> dict[str, Any]:
    """``account``'s row as the mapper writes it, by column name (as a fetched row reads)."""
    values = account_values(cipher, account, ACCOUNT_COLUMNS, forms=forms)
    return dict(zip(ACCOUNT_COLUMNS, values, strict=True))


BOTH = pytest.mark.parametrize("forms", [SQLITE_FORMS, POSTGRES_FORMS], ids=["sqlite", "postgres"])


@BOTH
@pytest.mark.parametrize("account", [ACCOUNT, OTHER], ids=["failing", "fresh"])
def test_an_account_comes_back_as_it_was_stored(
    cipher: Cipher, forms: StoredForms, account: Account
) -> None:
    row = stored(cipher, forms, account)

    assert account_from_row(cipher, row, tokens=True, forms=forms) == account
    # Without tokens, the two tokens stay unread; the rest is the same.
    listed = account_from_row(cipher, row, tokens=False, forms=forms)
    assert listed == replace(account, access_token=None, refresh_token=None)


@BOTH
def test_attempts_and_timers_come_back_as_they_were_stored(
    cipher: Cipher, forms: StoredForms
) -> None:
    attempt = Attempt("acme", NOW, "success", 12.3456, "1-abc", None)
    row = dict(zip(ATTEMPT_COLUMNS, attempt_values(attempt, forms=forms), strict=True))
    assert attempt_from_row(row, forms=forms) == replace(attempt, duration_ms=12.346)

    no_timer = stored(cipher, forms, replace(OTHER, account_id="never", token_expires_at=None))
    assert schedule_entries_from([stored(cipher, forms), no_timer], forms=forms) == [
        ScheduleEntry(
            account_id="acme",
            status=AccountStatus.ACTIVE,
            reconnect_token_at=NOW + timedelta(minutes=50),
            token_expires_at=NOW + timedelta(hours=1),
            refresh_token_expires_at=NOW + timedelta(days=100),
            refresh_token_hard_expires_at=None,
        )
    ]


def test_the_secrets_are_stored_encrypted_and_the_realm_found_by_its_digest(
    cipher: Cipher,
) -> None:
    row = stored(cipher, SQLITE_FORMS)

    for column in ("realm_id", "access_token", "refresh_token"):
        assert row[column].startswith(f"v1.{cipher.primary_key_id}.")
        assert getattr(ACCOUNT, column) not in row[column]
    assert row["key_id"] == cipher.primary_key_id
    assert row["realm_digest"] == cipher.digest(REALM, purpose=REALM_DIGEST_PURPOSE)


def test_each_database_gets_its_own_forms_of_instants_and_flags(cipher: Cipher) -> None:
    on_sqlite = stored(cipher, SQLITE_FORMS)
    on_postgres = stored(cipher, POSTGRES_FORMS)

    # SQLite: text whose order is time order, and 0/1.
    assert on_sqlite["token_expires_at"] == "2026-11-30T06:30:00.123456Z"
    assert on_sqlite["refresh_token_hard_expires_at"] is None
    assert on_sqlite["realm_verified"] == 0
    assert type(on_sqlite["realm_verified"]) is int
    # PostgreSQL: aware UTC datetimes (timestamptz) and booleans.
    assert on_postgres["token_expires_at"] == NOW + timedelta(hours=1)
    assert on_postgres["token_expires_at"].tzinfo is UTC
    assert on_postgres["refresh_token_hard_expires_at"] is None
    assert on_postgres["realm_verified"] is False
    # A ciphertext written for one database reads on the other: same key, same place.
    on_sqlite["access_token"] = on_postgres["access_token"]
    back = account_from_row(cipher, on_sqlite, tokens=True, forms=SQLITE_FORMS)
    assert back.access_token == ACCOUNT.access_token
