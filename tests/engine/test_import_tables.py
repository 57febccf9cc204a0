"""Real classic tables as import files: extra columns, NULL cells, the table's own names."""

from __future__ import annotations

from datetime import UTC, datetime

from qbo_daemon.engine.imports import check_rows, ignored_columns, read_rows

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


def test_extra_columns_are_ignored_and_named_once() -> None:
    text = (
        "id,user_id,account_id,companyid,access_token,refresh_token,company_name,"
        "token_expires_at,reconnect_token_at,created_at,updated_at\n"
        "1,7,42,9130350,at-1,rt-1,Acme,2024-05-01 10:00:00,,2023-01-01,2024-05-01\n"
        "2,8,43,9130351,,rt-2,,,,2023-01-01,2024-05-01\n"
    )
    rows = read_rows(text, "csv")
    good, bad = check_rows(rows, now=NOW)
    assert bad == []
    assert [(c.item.account_id, c.item.realm_id, c.item.refresh_token) for c in good] == [
        ("42", "9130350", "rt-1"),
        ("43", "9130351", "rt-2"),
    ]
    assert ignored_columns(rows) == ["user_id", "company_name"]


def test_a_literal_null_is_an_empty_cell() -> None:
    text = (
        "account_id,companyid,access_token,refresh_token,token_expires_at\n"
        "42,9130350,NULL,rt-1,NULL\n"
        "43,9130351,null,rt-2,\\N\n"
        "44,NULL,NULL,NULL,NULL\n"
    )
    good, bad = check_rows(read_rows(text, "csv"), now=NOW)
    assert [(c.item.account_id, c.item.access_token, c.item.token_expires_at) for c in good] == [
        ("42", None, None),
        ("43", None, None),
    ]
    assert [(r.position, r.message) for r in bad] == [(4, "realm_id: required")]


def test_the_header_may_use_the_tables_own_names() -> None:
    text = (
        "QBO_ACCOUNTS.ACCOUNT_ID,qbo_accounts.CompanyId,qbo_accounts.refresh_token\n"
        "42,9130350,rt-1\n"
    )
    rows = read_rows(text, "csv")
    good, bad = check_rows(rows, now=NOW)
    assert (bad, [(c.item.account_id, c.item.realm_id) for c in good]) == ([], [("42", "9130350")])
    assert ignored_columns(rows) == []


def test_json_lines_from_a_table_ignore_its_other_keys() -> None:
    text = (
        '{"id": 1, "account_id": 42, "companyid": "9130350", "refresh_token": "rt-1",'
        ' "user_id": 7, "created_at": "2023-01-01"}\n'
        '{"id": 2, "account_id": 43, "companyid": "9130351", "refresh_token": "rt-2",'
        ' "plan": null}\n'
    )
    rows = read_rows(text, "jsonl")
    good, bad = check_rows(rows, now=NOW)
    assert (bad, [c.item.account_id for c in good]) == ([], ["42", "43"])
    assert ignored_columns(rows) == ["user_id", "plan"]
