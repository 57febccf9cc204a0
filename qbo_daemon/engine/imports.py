"""Bringing existing connections in: rows from JSON lines or CSV, each validated alone.

The same checks run in the CLI (which reports a bad row by its line number
before anything is sent) and in the daemon (which is the authority, for
``PUT /v1/accounts/{id}/tokens`` and ``POST /v1/import``). A bad row is
refused with the field and the reason; the good rows of a batch are stored
in transactions of a thousand rows (``engine.accounts.IMPORT_CHUNK``). Every
check here is linear in the rows, and the daemon runs them off its event loop.

A CSV export of the classic ``qbo_accounts`` table is read as it is:
``companyid`` is the realm id, and ``id``, ``created_at``, ``updated_at`` and
``reconnect_token_at`` are ignored (the daemon computes its own schedule).
Any other column a real table has (``user_id``, ``company_name``, ...) is
ignored too, and named in :attr:`SourceRow.ignored` so the report can say so;
header names match in any case, and a table-qualified name
(``qbo_accounts.companyid``) counts as its column. A literal ``NULL`` (or
``\\N``) cell, as some exports write a null, is an empty cell.
Times without an offset are UTC, as Rails writes them (``2024-05-01 09:30:00``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from qbo_daemon.core.errors import QboDaemonError
from qbo_daemon.core.models import ACCOUNT_ID_RULE, ImportItem, iso, parse_iso, valid_account_id
from qbo_daemon.core.threads import yielding

TOKEN_FIELDS = (
    "realm_id",
    "refresh_token",
    "access_token",
    "token_expires_at",
    "refresh_token_expires_at",
)
IMPORT_FIELDS = ("account_id", *TOKEN_FIELDS)
REQUIRED_FIELDS = ("account_id", "realm_id", "refresh_token")
# Column names of other exports, mapped to ours.
ALIASES = {"companyid": "realm_id", "company_id": "realm_id", "realmid": "realm_id"}
# Columns of the classic qbo_accounts table that the daemon recomputes or does not need.
IGNORED_COLUMNS = frozenset({"id", "created_at", "updated_at", "reconnect_token_at"})
# Intuit access tokens live one hour; an expiry further ahead is a wrong time zone or unit.
MAX_ACCESS_TOKEN_AHEAD = timedelta(hours=1, minutes=5)
MAX_TEXT = 4096
# Positions a duplicate's reason names; the rest are counted.
LISTED_POSITIONS = 5

Format = Literal["auto", "jsonl", "csv"]
_REALM = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


class FieldError(QboDaemonError):
    """One field of one row is wrong; ``str`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class ImportFileError(QboDaemonError):
    """The file as a whole cannot be read (encoding, header); no row is imported."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One row of an import file: its line number and its fields, names normalised.

    ``error`` says why a row could not be read at all (bad JSON, wrong column count).
    ``ignored`` names the file's columns (or the line's keys) that were not used.
    """

    line: int
    fields: dict[str, Any]
    error: str | None = None
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Checked:
    position: int  # a line number in a file, an index in an API batch
    item: ImportItem


@dataclass(frozen=True, slots=True)
class Rejected:
    position: int
    account_id: str | None
    field: str | None
    reason: str

    @property
    def message(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


# -- one row ----------------------------------------------------------------------


def parse_item(
    data: Mapping[str, Any], *, now: datetime, account_id: str | None = None
) -> ImportItem:
    """Validate one row; raises :class:`FieldError` naming the first bad field.

    With ``account_id`` (the API's path), the row must not carry one itself.
    """
    allowed = TOKEN_FIELDS if account_id is not None else IMPORT_FIELDS
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise FieldError(unknown[0], "unknown field")
    if account_id is None:
        account_id = data.get("account_id")
        if account_id is None:
            raise FieldError("account_id", "required")
        if not valid_account_id(account_id):
            raise FieldError("account_id", f"must be {ACCOUNT_ID_RULE}")
    assert isinstance(account_id, str)
    realm_id = data.get("realm_id")
    realm_id = realm_id.strip() if isinstance(realm_id, str) else realm_id
    if realm_id is None or realm_id == "":
        raise FieldError("realm_id", "required")
    if not isinstance(realm_id, str) or not _REALM.fullmatch(realm_id):
        raise FieldError("realm_id", "expected a QuickBooks company id (letters, digits, - and _)")
    refresh_token = _text(data, "refresh_token", required=True)
    assert refresh_token is not None
    access_token = _text(data, "access_token", required=False)
    token_expires_at = _time(data, "token_expires_at")
    if token_expires_at is not None and token_expires_at - now > MAX_ACCESS_TOKEN_AHEAD:
        raise FieldError(
            "token_expires_at",
            "more than an hour ahead, but Intuit access tokens live one hour "
            "(times without an offset are read as UTC)",
        )
    refresh_token_expires_at = _time(data, "refresh_token_expires_at")
    if refresh_token_expires_at is not None and refresh_token_expires_at <= now:
        raise FieldError(
            "refresh_token_expires_at",
            "already passed: this connection cannot be refreshed; the user must reconnect",
        )
    return ImportItem(
        account_id=account_id,
        realm_id=realm_id,
        refresh_token=refresh_token,
        access_token=access_token,
        token_expires_at=token_expires_at,
        refresh_token_expires_at=refresh_token_expires_at,
    )


def _text(data: Mapping[str, Any], field: str, *, required: bool) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise FieldError(field, "required")
        return None
    if not isinstance(value, str):
        raise FieldError(field, "expected a string")
    value = value.strip()
    if not value:
        if required:
            raise FieldError(field, "required")
        return None
    if len(value) > MAX_TEXT or not value.isprintable() or " " in value:
        raise FieldError(field, "expected a single printable word of at most 4096 characters")
    return value


def _time(data: Mapping[str, Any], field: str) -> datetime | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(field, "expected an ISO 8601 time such as 2024-05-01T09:30:00Z")
    text = value.strip()
    if not text:
        return None
    if text.upper().endswith(" UTC"):
        text = text[:-4]
    try:
        if not _TIME.match(text):
            raise ValueError(text)
        return parse_iso(text)
    except ValueError:
        raise FieldError(field, "expected an ISO 8601 time such as 2024-05-01T09:30:00Z") from None


# -- a batch ----------------------------------------------------------------------


def check_batch(
    entries: Iterable[tuple[int, object]], *, now: datetime
) -> tuple[list[Checked], list[Rejected]]:
    """Validate every row; a duplicate account or refresh token refuses every copy of it.

    Linear in the rows: copies are found through dicts, and each group of copies is
    described once, on its first row (naming at most :data:`LISTED_POSITIONS` others);
    the other copies point to that row.
    """
    good: list[Checked] = []
    bad: list[Rejected] = []
    for position, data in yielding(entries):  # often on a worker thread
        if not isinstance(data, Mapping):
            bad.append(Rejected(position, None, None, "expected a JSON object"))
            continue
        given = data.get("account_id")
        account_id = given if isinstance(given, str) else None
        try:
            good.append(Checked(position, parse_item(data, now=now)))
        except FieldError as exc:
            bad.append(Rejected(position, account_id, exc.field, exc.reason))
    by_account: dict[str, list[int]] = {}
    by_token: dict[str, list[int]] = {}
    for checked in good:
        by_account.setdefault(checked.item.account_id, []).append(checked.position)
        by_token.setdefault(checked.item.refresh_token, []).append(checked.position)
    kept = []
    for checked in good:
        item = checked.item
        group = by_account[item.account_id]
        field, what = "account_id", "duplicate account_id"
        if len(group) == 1:
            group = by_token[item.refresh_token]
            field, what = "refresh_token", "the same refresh token as another row"
        if len(group) == 1:
            kept.append(checked)
            continue
        reason = f"{what} ({_copies(group, checked.position)}); every copy is refused"
        bad.append(Rejected(checked.position, item.account_id, field, reason))
    bad.sort(key=lambda r: r.position)
    return kept, bad


def _copies(group: list[int], position: int) -> str:
    """Where the other copies are: listed on the group's first row, referred to elsewhere."""
    if position != group[0]:
        return f"first at {group[0]}"
    others = group[1 : 1 + LISTED_POSITIONS]
    listed = ", ".join(str(p) for p in others)
    more = len(group) - 1 - len(others)
    return f"also at {listed} and {more:,} more" if more else f"also at {listed}"


def item_json(item: ImportItem) -> dict[str, Any]:
    """An item as ``POST /v1/import`` takes it (no None values)."""
    data: dict[str, Any] = {
        "account_id": item.account_id,
        "realm_id": item.realm_id,
        "refresh_token": item.refresh_token,
        "access_token": item.access_token,
        "token_expires_at": iso(item.token_expires_at),
        "refresh_token_expires_at": iso(item.refresh_token_expires_at),
    }
    return {key: value for key, value in data.items() if value is not None}


# -- files ------------------------------------------------------------------------


def read_rows(text: str, fmt: Format = "auto", *, name: str = "") -> list[SourceRow]:
    """Rows of an import file, or :class:`ImportFileError` when the file cannot be read."""
    if fmt == "auto":
        fmt = _detect(text, name)
    return _jsonl_rows(text) if fmt == "jsonl" else _csv_rows(text)


def read_file(path: Path, fmt: Format = "auto") -> list[SourceRow]:
    """Read the import file at ``path`` (UTF-8, with or without a byte order mark)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ImportFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ImportFileError(f"{path} is not UTF-8 text") from None
    return read_rows(text, fmt, name=path.name)


def check_rows(rows: Iterable[SourceRow], *, now: datetime) -> tuple[list[Checked], list[Rejected]]:
    """:func:`check_batch` over a file's rows, positions being line numbers."""
    rows = list(rows)
    good, bad = check_batch(((r.line, r.fields) for r in rows if r.error is None), now=now)
    bad.extend(Rejected(r.line, None, None, r.error) for r in rows if r.error is not None)
    bad.sort(key=lambda r: r.position)
    return good, bad


def _detect(text: str, name: str) -> Format:
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix == "csv":
        return "csv"
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _column(key: object) -> str:
    """Our name for a column or key: aliases mapped, any case, ``table.column`` as ``column``."""
    name = str(key).strip().lower().rsplit(".", 1)[-1]
    return ALIASES.get(name, name)


def is_null(cell: str) -> bool:
    """A CSV cell that stands for a null: empty, ``NULL`` or ``\\N`` (as some exports write)."""
    text = cell.strip()
    return not text or text.upper() == "NULL" or text == "\\N"


def _normalise(raw: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Map aliases to our names; drop the classic table's ignored columns, and others
    (returned, as spelled in the file)."""
    fields: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        name = _column(key)
        if name in IGNORED_COLUMNS:
            continue
        if name not in IMPORT_FIELDS:
            ignored.append(str(key))
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name in ("account_id", "realm_id") and is_int and value >= 0:
            value = str(value)  # an integer tenant or company id in JSON
        fields[name] = value
    return fields, tuple(ignored)


def _jsonl_rows(text: str) -> list[SourceRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(SourceRow(number, {}, f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(data, dict):
            rows.append(SourceRow(number, {}, "expected a JSON object on this line"))
            continue
        fields, ignored = _normalise(data)
        rows.append(SourceRow(number, fields, ignored=ignored))
    return rows


def _csv_rows(text: str) -> list[SourceRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    ignored: tuple[str, ...] = ()
    rows: list[SourceRow] = []
    next_line = 1
    try:
        for record in reader:
            line, next_line = next_line, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = _header(record, line)
                ignored = tuple(
                    cell.strip()
                    for cell, name in zip(record, header, strict=True)
                    if not name and cell.strip()
                )
                continue
            if len(record) != len(header):
                message = f"expected {len(header)} columns, found {len(record)}"
                rows.append(SourceRow(line, {}, message, ignored=ignored))
                continue
            raw = {
                name: cell
                for name, cell in zip(header, record, strict=True)
                if name and not is_null(cell)
            }
            rows.append(SourceRow(line, _normalise(raw)[0], ignored=ignored))
    except csv.Error as exc:
        raise ImportFileError(f"line {reader.line_num}: not valid CSV: {exc}") from None
    if header is None:
        raise ImportFileError("the file is empty: expected a header row and data rows")
    return rows


def _header(record: list[str], line: int) -> list[str]:
    """Our name of each column, ``""`` for a column that is not used."""
    known = set(IMPORT_FIELDS) | IGNORED_COLUMNS
    names = [_column(cell) for cell in record]
    seen: set[str] = set()
    for name in names:
        if name in known and name in seen:
            raise ImportFileError(f"line {line}: column {name!r} appears twice")
        seen.add(name)
    missing = [name for name in REQUIRED_FIELDS if name not in seen]
    if missing:
        unused = [
            cell.strip() for cell, name in zip(record, names, strict=True) if name not in known
        ]
        found = f"; columns not used: {', '.join(unused)}" if unused else ""
        raise ImportFileError(
            f"line {line}: missing column(s) {', '.join(missing)} "
            f"(companyid is taken as realm_id){found}"
        )
    return [name if name in known else "" for name in names]


def ignored_columns(rows: Iterable[SourceRow]) -> list[str]:
    """Every column or key the rows did not use, once each, in the order first seen."""
    return list(dict.fromkeys(name for row in rows for name in row.ignored))
