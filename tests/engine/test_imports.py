"""Importing existing connections: file formats, row checks, and POST /v1/import."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from qbo_daemon.core.models import iso
from qbo_daemon.engine.imports import (
    FieldError,
    ImportFileError,
    check_rows,
    ignored_columns,
    item_json,
    parse_item,
    read_file,
    read_rows,
)
from tests.conftest import StartDaemon
from tests.harness import RunningDaemon, next_refresh, wait_for
from tests.http.test_api import call, refreshes_of

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)

CLASSIC_HEADER = (
    "id,access_token,refresh_token,companyid,account_id,created_at,updated_at,"
    "token_expires_at,reconnect_token_at"
)


def _problems(text: str, fmt: Any = "auto") -> dict[int, str]:
    _, bad = check_rows(read_rows(text, fmt), now=NOW)
    return {r.position: r.message for r in bad}


# -- reading files ----------------------------------------------------------------------


def test_a_classic_qbo_accounts_export_is_read_as_rails_wrote_it() -> None:
    text = "\r\n".join(
        [
            CLASSIC_HEADER,
            "1,at-1,rt-1,9130350,42,2023-01-01 10:00:00,2024-05-01 09:00:00,"
            "2024-05-01 10:00:00,2024-05-01 09:50:00",
            '2,,rt-2,9130351,43,2023-01-01 10:00:00,2024-05-01 09:00:00,,""',
            "3,at-3,,9130352,44,2023-01-01 10:00:00,2024-05-01 09:00:00,,",
            "",
        ]
    )
    good, bad = check_rows(read_rows(text, name="qbo_accounts.csv"), now=NOW)
    assert [(c.position, c.item.account_id, c.item.realm_id) for c in good] == [
        (2, "42", "9130350"),
        (3, "43", "9130351"),
    ]
    first = good[0].item
    assert (first.access_token, first.refresh_token) == ("at-1", "rt-1")
    assert first.token_expires_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)  # naive = UTC
    assert good[1].item.access_token is None
    assert [(r.position, r.account_id, r.message) for r in bad] == [
        (4, "44", "refresh_token: required")
    ]


def test_csv_line_numbers_count_blank_lines_and_quoted_newlines() -> None:
    text = (
        "account_id,realm_id,refresh_token,access_token\n"
        "\n"
        'a1,1,rt-a1,"two\nlines"\n'
        "a2,2,rt-a2\n"
        "a3,3,rt-a3,at\n"
    )
    assert _problems(text, "csv") == {
        3: "access_token: expected a single printable word of at most 4096 characters",
        5: "expected 4 columns, found 3",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "account_id,realm_id,refresh_tokn\n",
            "line 1: missing column(s) refresh_token (companyid is taken as realm_id); "
            "columns not used: refresh_tokn",
        ),
        ("account_id,refresh_token\n", "line 1: missing column(s) realm_id"),
        ("account_id,companyid,realm_id,refresh_token\n", "column 'realm_id' appears twice"),
        ("", "the file is empty"),
    ],
)
def test_a_bad_csv_header_refuses_the_file(text: str, message: str) -> None:
    with pytest.raises(ImportFileError, match=re.escape(message)):
        read_rows(text, "csv")


def test_json_lines_report_each_bad_line() -> None:
    text = "\n".join(
        [
            '{"account_id": 7, "companyid": 123, "refresh_token": "rt-7"}',
            "{not json",
            "[1]",
            '{"account_id": "a", "realm_id": "1", "refresh_token": "rt-a", "colour": "red"}',
            '{"account_id": "b", "realm_id": "1", "refresh_token": true}',
            '{"account_id": "bad id", "realm_id": "1", "refresh_token": "rt-b"}',
        ]
    )
    rows = read_rows(text)
    good, bad = check_rows(rows, now=NOW)
    assert [(c.position, c.item.account_id, c.item.realm_id) for c in good] == [
        (1, "7", "123"),
        (4, "a", "1"),  # a key the daemon does not use is ignored, and named
    ]
    assert ignored_columns(rows) == ["colour"]
    messages = {r.position: r.message for r in bad}
    assert messages[2].startswith("not valid JSON")
    assert messages[3] == "expected a JSON object on this line"
    assert messages[5] == "refresh_token: expected a string"
    assert messages[6].startswith("account_id: must be 1 to 128 characters")


def test_files_are_utf8_with_or_without_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "accounts.csv"
    path.write_bytes(b"\xef\xbb\xbfaccount_id,realm_id,refresh_token\na,1,rt\n")
    assert [row.fields for row in read_file(path)] == [
        {"account_id": "a", "realm_id": "1", "refresh_token": "rt"}
    ]
    path.write_bytes(b"account_id,realm_id,refresh_token\n\xff,1,rt\n")
    with pytest.raises(ImportFileError, match="not UTF-8"):
        read_file(path)
    with pytest.raises(ImportFileError, match="cannot read"):
        read_file(tmp_path / "missing.csv")


# -- one row ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01 10:00:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01 10:00:00.250000", datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01 12:00:00+02", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01 10:00:00 UTC", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ],
)
def test_times_are_utc_unless_they_say_otherwise(value: str, expected: datetime) -> None:
    item = parse_item(
        {"account_id": "a", "realm_id": "1", "refresh_token": "rt", "token_expires_at": value},
        now=NOW,
    )
    assert item.token_expires_at == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token_expires_at": "2024-05-01"}, "token_expires_at: expected an ISO 8601 time"),
        ({"token_expires_at": "tomorrow"}, "token_expires_at: expected an ISO 8601 time"),
        ({"token_expires_at": "2024-05-01 12:00:00"}, "token_expires_at: more than an hour ahead"),
        ({"refresh_token_expires_at": "2024-05-01 09:00:00"}, "refresh_token_expires_at: already"),
        ({"realm_id": "12 34"}, "realm_id: expected a QuickBooks company id"),
        ({"refresh_token": " "}, "refresh_token: required"),
    ],
)
def test_a_bad_field_is_named(fields: dict[str, Any], message: str) -> None:
    row = {"account_id": "a", "realm_id": "1", "refresh_token": "rt", **fields}
    with pytest.raises(FieldError, match=message):
        parse_item(row, now=NOW)


def test_duplicates_within_a_file_are_all_refused() -> None:
    text = "\n".join(
        [
            "account_id,realm_id,refresh_token",
            "a,1,rt-a",
            "b,2,rt-b",
            "a,3,rt-a2",
            "c,4,rt-b",
            "d,5,rt-d",
        ]
    )
    good, bad = check_rows(read_rows(text, "csv"), now=NOW)
    assert [c.item.account_id for c in good] == ["d"]
    assert {r.position: (r.field, r.reason) for r in bad} == {
        2: ("account_id", "duplicate account_id (also at 4); every copy is refused"),
        4: ("account_id", "duplicate account_id (first at 2); every copy is refused"),
        3: (
            "refresh_token",
            "the same refresh token as another row (also at 5); every copy is refused",
        ),
        5: (
            "refresh_token",
            "the same refresh token as another row (first at 3); every copy is refused",
        ),
    }


def test_a_placeholder_refresh_token_on_every_row_is_described_once() -> None:
    """Every row of an export carries one placeholder token: the group is named once.

    Each row's reason used to list every other copy, so the reasons (and the time to
    build them) grew with the square of the rows: 30,000 rows took minutes.
    """
    rows = 3000
    text = "account_id,realm_id,refresh_token\n" + "".join(
        f"acct-{n},{n},PLACEHOLDER\n" for n in range(rows)
    )
    started = time.perf_counter()
    good, bad = check_rows(read_rows(text, "csv"), now=NOW)
    elapsed = time.perf_counter() - started
    assert good == []
    assert len(bad) == rows
    first, second, last = bad[0], bad[1], bad[-1]
    assert first.reason == (
        f"the same refresh token as another row (also at 3, 4, 5, 6, 7 and {rows - 6:,} more); "
        "every copy is refused"
    )
    assert (second.position, second.reason) == (
        3,
        "the same refresh token as another row (first at 2); every copy is refused",
    )
    assert last.reason == second.reason
    assert max(len(r.reason) for r in bad) < 120
    assert elapsed < 2.0, f"{rows} rows took {elapsed:.1f}s"


def test_item_json_round_trips() -> None:
    row = {
        "account_id": "a",
        "realm_id": "1",
        "refresh_token": "rt",
        "access_token": "at",
        "token_expires_at": "2024-05-01T10:00:00.000000Z",
    }
    item = parse_item(row, now=NOW)
    assert item_json(item) == row
    assert parse_item(item_json(item), now=NOW) == item


# -- POST /v1/import --------------------------------------------------------------------


def _row(running: RunningDaemon, account_id: str, **extra: Any) -> dict[str, Any]:
    grant = running.simulator.grant()
    return {
        "account_id": account_id,
        "realm_id": grant["realm_id"],
        "refresh_token": grant["refresh_token"],
        **extra,
    }


async def test_a_batch_keeps_the_good_rows_and_reports_the_bad(
    daemon_factory: StartDaemon,
) -> None:
    running = await daemon_factory()
    now = datetime.now(UTC)
    fresh = _row(
        running,
        "fresh",
        access_token="valid-access-token",
        token_expires_at=iso(now + timedelta(minutes=50)),
    )
    stale = _row(
        running, "stale", access_token="old", token_expires_at=iso(now - timedelta(hours=2))
    )
    rows = [fresh, {"account_id": "broken", "realm_id": "1"}, stale, "not an object", fresh]
    rows[4] = {**fresh, "account_id": "fresh-twin"}  # the same refresh token twice

    status, dry = await call(
        running, "POST", "/v1/import", json={"accounts": rows, "dry_run": True}
    )
    assert status == 200
    assert dry["dry_run"] is True
    assert (await call(running, "GET", "/v1/accounts"))[1]["accounts"] == []

    status, report = await call(running, "POST", "/v1/import", json={"accounts": rows})
    assert status == 200
    assert [(e["index"], e["account_id"]) for e in report["imported"]] == [(2, "stale")]
    assert [(e["index"], e["field"]) for e in report["skipped"]] == [
        (0, "refresh_token"),
        (1, "refresh_token"),
        (3, None),
        (4, "refresh_token"),
    ]
    assert report["imported"][0]["refreshing_now"] is True
    await wait_for(
        lambda: any(e.status == 200 for e in refreshes_of(running, stale["refresh_token"]))
    )

    status, report = await call(running, "POST", "/v1/import", json={"accounts": [fresh, stale]})
    assert [e["account_id"] for e in report["imported"]] == ["fresh"]
    assert report["imported"][0]["refreshing_now"] is False  # its access token is still good
    assert report["skipped"] == [
        {
            "index": 1,
            "account_id": "stale",
            "field": "account_id",
            "reason": "already exists; not replaced",
        }
    ]
    assert refreshes_of(running, fresh["refresh_token"]) == []
    status, token = await call(running, "GET", "/v1/accounts/fresh/token")
    assert (status, token["access_token"]) == (200, "valid-access-token")

    replacement = _row(running, "stale")
    status, report = await call(
        running, "POST", "/v1/import", json={"accounts": [replacement], "replace": True}
    )
    assert [(e["account_id"], e["replaced"]) for e in report["imported"]] == [("stale", True)]
    account = await running.services.storage.load("stale")
    assert account.refresh_token == replacement["refresh_token"]


async def test_a_batch_is_stored_a_thousand_rows_per_transaction(
    daemon_factory: StartDaemon,
) -> None:
    """A failing row fails its chunk only: the chunks before it stay stored and scheduled.

    So a refresh's commit waits behind one chunk, never behind a whole import.
    """
    running = await daemon_factory()
    expires = iso(datetime.now(UTC) + timedelta(minutes=50))
    rows = [
        {
            "account_id": f"bulk-{n:04d}",
            "realm_id": str(9_000_000 + n),
            "refresh_token": f"bulk-refresh-{n:04d}",
            "access_token": f"bulk-access-{n:04d}",
            "token_expires_at": expires,
        }
        for n in range(2500)
    ]
    with contextlib.closing(sqlite3.connect(running.database)) as db, db:
        db.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON accounts "
            "WHEN NEW.account_id = 'bulk-1500' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
        )
    status, body = await call(running, "POST", "/v1/import", json={"accounts": rows})
    assert status == 503
    assert body["error"] == "storage_unavailable"
    assert "rows up to index 999 are stored" in body["detail"]
    assert "rows after index 999 were not stored" in body["detail"]
    with contextlib.closing(sqlite3.connect(running.database)) as db:
        stored = [r[0] for r in db.execute("SELECT account_id FROM accounts ORDER BY account_id")]
    assert stored == [f"bulk-{n:04d}" for n in range(1000)]
    assert await next_refresh(running.services, "bulk-0000") is not None
    assert await next_refresh(running.services, "bulk-0999") is not None
    assert await next_refresh(running.services, "bulk-1000") is None

    # Sending the rest again (as the answer says) completes the import.
    with contextlib.closing(sqlite3.connect(running.database)) as db, db:
        db.execute("DROP TRIGGER refuse_poison")
    status, body = await call(running, "POST", "/v1/import", json={"accounts": rows[1000:]})
    assert (status, len(body["imported"]), body["skipped"]) == (200, 1500, [])


async def test_whether_an_account_exists_is_read_in_the_writing_transaction(
    daemon_factory: StartDaemon,
) -> None:
    """An account that appears after the request came in is not overwritten without replace.

    The import used to read which accounts exist before it wrote: an account
    connected in between was overwritten, and reported as new. Here a trigger
    stores "late" the moment the import writes its first row.
    """
    running = await daemon_factory()
    with contextlib.closing(sqlite3.connect(running.database)) as db, db:
        db.execute(
            "CREATE TRIGGER connect_late AFTER INSERT ON accounts "
            "WHEN NEW.account_id = 'early' BEGIN "
            "INSERT INTO accounts (account_id, status, refresh_token, created_at, updated_at) "
            "VALUES ('late', 'active', 'connected-meanwhile', "
            "'2024-05-01T09:00:00.000000Z', '2024-05-01T09:00:00.000000Z'); END"
        )
    rows = [_row(running, "early"), _row(running, "late")]
    status, report = await call(running, "POST", "/v1/import", json={"accounts": rows})
    assert status == 200
    assert [(e["account_id"], e["replaced"]) for e in report["imported"]] == [("early", False)]
    assert report["skipped"] == [
        {
            "index": 1,
            "account_id": "late",
            "field": "account_id",
            "reason": "already exists; not replaced",
        }
    ]
    with contextlib.closing(sqlite3.connect(running.database)) as db:
        [(token,)] = db.execute("SELECT refresh_token FROM accounts WHERE account_id = 'late'")
    assert token == "connected-meanwhile"
