"""The way out: every live connection as rows a cron job's table can take back.

Two shapes. CSV has the columns of the classic ``qbo_accounts`` table
(:data:`CSV_COLUMNS`, ``companyid`` being the realm id), so ``psql``'s
``\\copy qbo_accounts (<those columns>) from 'FILE' csv header`` loads it.
JSON lines use the daemon's own names (:data:`JSONL_FIELDS`). Both are read
back by ``qbo-daemon import`` unchanged.

Times are ISO 8601 UTC with a ``Z``: PostgreSQL reads that instant right into
a ``timestamptz`` column and, ignoring the zone as it does for literals, the
same UTC wall time into a ``timestamp`` column (which is how Rails stores UTC).

Only live connections (``active``, ``expired``) are exported: an account that
needs a reconnect holds a refresh token Intuit has refused, and a disconnected
one holds none. :func:`split_live` names the others so the caller can say so.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from qbo_daemon.core.models import Account, AccountStatus, iso

ExportFormat = Literal["csv", "jsonl"]

CSV_COLUMNS = (
    "account_id",
    "companyid",
    "access_token",
    "refresh_token",
    "token_expires_at",
    "reconnect_token_at",
    "created_at",
    "updated_at",
)
JSONL_FIELDS = (
    "account_id",
    "realm_id",
    "access_token",
    "refresh_token",
    "token_expires_at",
    "reconnect_token_at",
    "refresh_token_expires_at",
    "created_at",
    "updated_at",
)
LIVE_STATUSES = frozenset({AccountStatus.ACTIVE.value, AccountStatus.EXPIRED.value})


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One exported connection. Tokens are ``None`` unless secrets were asked for."""

    account_id: str
    realm_id: str | None
    access_token: str | None
    refresh_token: str | None
    token_expires_at: str | None
    reconnect_token_at: str | None
    refresh_token_expires_at: str | None
    created_at: str | None
    updated_at: str | None

    def as_jsonl(self) -> dict[str, Any]:
        data = {
            "account_id": self.account_id,
            "realm_id": self.realm_id,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_expires_at": self.token_expires_at,
            "reconnect_token_at": self.reconnect_token_at,
            "refresh_token_expires_at": self.refresh_token_expires_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        return {key: value for key, value in data.items() if value is not None}

    def as_csv(self) -> tuple[str, ...]:
        return (
            self.account_id,
            self.realm_id or "",
            self.access_token or "",
            self.refresh_token or "",
            self.token_expires_at or "",
            self.reconnect_token_at or "",
            self.created_at or "",
            self.updated_at or "",
        )


@dataclass(frozen=True, slots=True)
class LeftOut:
    account_id: str
    status: str


def split_live(statuses: Iterable[tuple[str, str]]) -> tuple[set[str], list[LeftOut]]:
    """``(account_id, status)`` pairs: the live account ids, and the others with why."""
    live: set[str] = set()
    left_out: list[LeftOut] = []
    for account_id, status in statuses:
        if status in LIVE_STATUSES:
            live.add(account_id)
        else:
            left_out.append(LeftOut(account_id, status))
    return live, left_out


def row_from_account(account: Account, *, include_secrets: bool) -> ExportRow:
    """An account read from the database (tokens decrypted)."""
    return ExportRow(
        account_id=account.account_id,
        realm_id=account.realm_id,
        # An import without a known-valid access token stores "": there is none.
        access_token=(account.access_token or None) if include_secrets else None,
        refresh_token=account.refresh_token if include_secrets else None,
        token_expires_at=iso(account.token_expires_at),
        reconnect_token_at=iso(account.reconnect_token_at),
        refresh_token_expires_at=iso(account.refresh_token_expires_at),
        created_at=iso(account.created_at),
        updated_at=iso(account.updated_at),
    )


def row_from_listing(account: Mapping[str, Any]) -> ExportRow:
    """An account as ``GET /v1/accounts`` shows it: never a token."""

    def text(key: str) -> str | None:
        value = account.get(key)
        return value if isinstance(value, str) and value else None

    return ExportRow(
        account_id=str(account["account_id"]),
        realm_id=text("realm_id"),
        access_token=None,
        refresh_token=None,
        token_expires_at=text("token_expires_at"),
        reconnect_token_at=text("reconnect_token_at"),
        refresh_token_expires_at=text("refresh_token_expires_at"),
        created_at=text("created_at"),
        updated_at=text("updated_at"),
    )


def write_rows(rows: Iterable[ExportRow], out: TextIO, fmt: ExportFormat) -> int:
    """Write ``rows`` in ``fmt``; returns how many were written."""
    count = 0
    if fmt == "csv":
        # "\n" endings: psql's \copy and Python's csv module both read them; quoting
        # only where a value needs it, so an empty cell stays NULL for \copy.
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(row.as_csv())
            count += 1
        return count
    for row in rows:
        out.write(json.dumps(row.as_jsonl(), separators=(", ", ": ")) + "\n")
        count += 1
    return count
