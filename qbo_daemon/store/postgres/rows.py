"""What PostgreSQL's statements need beyond the one row mapper. No I/O.

Accounts and attempts become values and back through ``store/rows.py``, the
one row mapper, given :data:`POSTGRES_FORMS`: times are ``timestamptz`` (aware
UTC datetimes both ways) and flags ``boolean``. The columns are the one list
(``store.rows.ACCOUNT_COLUMNS``), and the secrets are encrypted exactly as on
SQLite (the same :class:`Cipher` and associated data), so a ciphertext copies
between the two databases unchanged; so does ``realm_digest``. Here are the
column subsets of PostgreSQL's statements and the payload of the change each
node hears. The statements' shared pieces (``INSERT_COLUMNS``, ``SELECT_ACCOUNTS``,
``ATTEMPT_COLUMNS``) are the one mapper's.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from qbo_daemon.core.models import AccountStatus, utc
from qbo_daemon.store.port import AccountChange
from qbo_daemon.store.rows import ACCOUNT_COLUMNS, DERIVED_COLUMNS, SECRET_COLUMNS, StoredForms

# What a write of the credentials sets: all but the row's identity and its version.
TOKEN_COLUMNS = tuple(c for c in ACCOUNT_COLUMNS[3:] if c != "version")
# What a failure note sets: the credentials (and the key they are under) stay.
NOTE_COLUMNS = tuple(
    c for c in TOKEN_COLUMNS if c not in (*SECRET_COLUMNS, *DERIVED_COLUMNS, "key_id")
)
# What a connection or an import sets on an existing row: when it last failed stays.
CONNECTION_COLUMNS = tuple(c for c in TOKEN_COLUMNS if c != "last_failure_at")
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


def _stored_instant(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def _read_instant(value: datetime | None) -> datetime | None:
    return value  # asyncpg reads a timestamptz as an aware UTC datetime


# PostgreSQL: ``timestamptz`` and ``boolean`` both ways (store.rows.StoredForms).
POSTGRES_FORMS = StoredForms(instant=_stored_instant, read_instant=_read_instant, flag=bool)


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
