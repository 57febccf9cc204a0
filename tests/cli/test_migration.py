"""Moving in and moving out, as docs/migrating-from-cron.md tells an operator to.

Real processes throughout: ``qbo-daemon run`` and ``qbo-daemon simulator``
subprocesses (the helpers of ``test_commands``), the CLI as a subprocess, and
for the runbook a real PostgreSQL server holding the classic cron's table, on
which the runbook's own SQL blocks are run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from qbo_daemon.core.models import iso
from qbo_daemon.engine.export import CSV_COLUMNS
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from tests.cli.postgres import postgres
from tests.cli.test_commands import (
    ROOT,
    Daemon,
    Simulator,
    cli,
    http,
    start_daemon,
    wait_until,
    write_config,
)

# The module's `qbo-daemon simulator` subprocess, a fixture shared with test_commands.
from tests.cli.test_commands import simulator as simulator

RUNBOOK = ROOT / "docs" / "migrating-from-cron.md"
SECRETS = ("realm_id", "access_token", "refresh_token")


def fresh_daemon(simulator: Simulator, directory: Path) -> tuple[Daemon, str]:
    """A daemon on a new database; returns it and its encryption key."""
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    config, api_url, api_key = write_config(directory, simulator.url, [key])
    return start_daemon(config, api_url, api_key), key


def connections(database: Path, key: str) -> dict[str, dict[str, Any]]:
    """Every account of a daemon's database, decrypted (read while it is stopped)."""
    cipher = Cipher([EncryptionKey.from_text(key)])
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM accounts").fetchall()
    found = {}
    for row in rows:
        data = dict(row)
        for column in SECRETS:
            if data[column] is not None:
                data[column] = cipher.decrypt(
                    data[column], table="accounts", column=column, row_key=data["account_id"]
                )
        found[data["account_id"]] = data
    return found


def refresh_calls(simulator: Simulator, refresh_token: str) -> int:
    return sum(
        1
        for entry in simulator.log()
        if entry["endpoint"] == "token" and entry["presented_refresh_token"] == refresh_token
    )


def settled(daemon: Daemon, account_id: str) -> bool:
    status, body = http("GET", f"{daemon.api_url}/v1/accounts/{account_id}", key=daemon.api_key)
    assert status == 200, body
    return bool(body["status"] != "active" or body["version"] >= 2)


def wall_time(stored: str) -> datetime:
    """A time the daemon stored (ISO 8601 with Z) as the UTC wall time, without a zone."""
    return datetime.fromisoformat(stored).astimezone(UTC).replace(tzinfo=None)


def sql_block(containing: str) -> str:
    blocks: list[str] = re.findall(r"```sql\n(.*?)```", RUNBOOK.read_text(encoding="utf-8"), re.S)
    return next(block for block in blocks if containing in block)


# -- import -> export -> import ---------------------------------------------------------------


def test_import_export_import_gives_the_same_connections(
    simulator: Simulator, tmp_path: Path
) -> None:
    first, first_key = fresh_daemon(simulator, tmp_path / "first")
    try:
        now = datetime.now(UTC)
        grants = [simulator.grant() for _ in range(4)]
        rows = [
            {
                "account_id": f"rt-{n}",
                "realm_id": g["realm_id"],
                "refresh_token": g["refresh_token"],
                # Two with a live access token (kept as they are), two refreshed at once.
                **(
                    {
                        "access_token": g["access_token"],
                        "token_expires_at": iso(now + timedelta(minutes=50)),
                    }
                    if n < 2
                    else {}
                ),
            }
            for n, g in enumerate(grants)
        ]
        text = "".join(json.dumps(row) + "\n" for row in rows)
        result = cli("import", "-", config=first.config, stdin=text)
        assert result.returncode == 0, result.stdout + result.stderr
        for n in (2, 3):
            wait_until(lambda n=n: settled(first, f"rt-{n}"), what=f"rt-{n} refreshed")
        # A dead one and a disconnected one are left out, and named.
        body = {"realm_id": "123", "refresh_token": "not-a-token-intuit-knows"}
        assert (
            http("PUT", f"{first.api_url}/v1/accounts/dead/tokens", body, first.api_key)[0] == 201
        )
        wait_until(lambda: settled(first, "dead"), what="dead refused")
        grant = simulator.grant()
        body = {"realm_id": grant["realm_id"], "refresh_token": grant["refresh_token"]}
        assert (
            http("PUT", f"{first.api_url}/v1/accounts/gone/tokens", body, first.api_key)[0] == 201
        )
        assert cli("disconnect", "gone", config=first.config).returncode == 0
    finally:
        first.stop()
    before = connections(tmp_path / "first" / "qbo-daemon.sqlite3", first_key)
    assert before["dead"]["status"] == "needs_reconnect"

    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("csv", "jsonl"):
        result = cli(
            "export",
            "--include-secrets",
            "--format",
            fmt,
            "--output",
            str(out / f"accounts.{fmt}"),
            config=first.config,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert stat.S_IMODE((out / f"accounts.{fmt}").stat().st_mode) == 0o600
        lines = result.stderr.splitlines()
        assert lines[0] == (
            f"exported 4 accounts ({fmt}, with tokens) to {out / f'accounts.{fmt}'}, "
            f"read from the database {tmp_path / 'first' / 'qbo-daemon.sqlite3'}"
        )
        assert lines[1:] == [
            "left out 1 disconnected (no working refresh token): gone",
            "left out 1 needs_reconnect (no working refresh token): dead",
        ]
    table = list(csv.reader(io.StringIO((out / "accounts.csv").read_text(encoding="utf-8"))))
    assert tuple(table[0]) == CSV_COLUMNS

    live = {f"rt-{n}" for n in range(4)}
    seconds = {}
    for fmt in ("csv", "jsonl"):
        second, second_key = fresh_daemon(simulator, tmp_path / f"second-{fmt}")
        seconds[fmt] = second
        try:
            result = cli("import", str(out / f"accounts.{fmt}"), config=second.config)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "ignored columns" not in result.stdout  # our own export: every column known
        finally:
            second.stop()
        after = connections(tmp_path / f"second-{fmt}" / "qbo-daemon.sqlite3", second_key)
        assert set(after) == live
        fields = ["realm_id", "access_token", "refresh_token", "token_expires_at", "status"]
        if fmt == "jsonl":  # JSON lines carry the refresh token's expiry too
            fields.append("refresh_token_expires_at")
        for account_id in live:
            assert {f: after[account_id][f] for f in fields} == {
                f: before[account_id][f] for f in fields
            }, account_id

    # The imported connections work: the second daemon refreshes them with those tokens.
    second = seconds["csv"]
    second = start_daemon(second.config, second.api_url, second.api_key)
    try:
        for account_id in sorted(live):
            result = cli("refresh", account_id, config=second.config)
            assert result.returncode == 0, result.stderr
    finally:
        second.stop()


# -- what export refuses ------------------------------------------------------------------------


def test_export_keeps_secrets_to_a_new_private_file_and_away_from_a_running_daemon(
    simulator: Simulator, tmp_path: Path
) -> None:
    daemon, _ = fresh_daemon(simulator, tmp_path / "d")
    try:
        grant = simulator.grant()
        body = {"realm_id": grant["realm_id"], "refresh_token": grant["refresh_token"]}
        assert (
            http("PUT", f"{daemon.api_url}/v1/accounts/acme/tokens", body, daemon.api_key)[0] == 201
        )
        wait_until(lambda: settled(daemon, "acme"), what="acme refreshed")

        # Secrets never to standard output.
        result = cli("export", "--include-secrets", config=daemon.config)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            "qbo-daemon: error: --include-secrets writes tokens only into a new file: "
            "add --output FILE\n"
        )
        # Never over an existing file.
        existing = tmp_path / "existing.csv"
        existing.write_text("keep me\n", encoding="utf-8")
        result = cli("export", "--output", str(existing), config=daemon.config)
        assert result.returncode == 2
        assert "exists: export writes only a new file" in result.stderr
        assert existing.read_text(encoding="utf-8") == "keep me\n"

        # With the daemon running: tokens are refused, the rest comes through its API.
        target = tmp_path / "tokens.csv"
        result = cli("export", "--include-secrets", "--output", str(target), config=daemon.config)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"qbo-daemon: error: a qbo-daemon is running on {daemon.config.parent}"
        )
        assert "stop it first (systemctl stop qbo-daemon)" in result.stderr
        assert not target.exists()

        result = cli("export", config=daemon.config)
        assert result.returncode == 0, result.stderr
        [header, row] = list(csv.reader(io.StringIO(result.stdout)))
        assert tuple(header) == CSV_COLUMNS
        exported = dict(zip(header, row, strict=True))
        assert exported["account_id"] == "acme"
        assert exported["companyid"] == grant["realm_id"]
        assert (exported["access_token"], exported["refresh_token"]) == ("", "")
        assert exported["token_expires_at"].endswith("Z")
        assert result.stderr == (
            f"exported 1 account (csv, without tokens), read from the daemon at {daemon.api_url}\n"
        )
        status, token = http("GET", f"{daemon.api_url}/v1/accounts/acme/token", key=daemon.api_key)
        assert status == 200
        assert token["access_token"] not in result.stdout
        assert grant["refresh_token"] not in result.stdout + result.stderr
    finally:
        daemon.stop()


# -- import --verify ------------------------------------------------------------------------------


def test_import_verify_refreshes_each_row_once_and_reports_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    daemon, _ = fresh_daemon(simulator, tmp_path / "d")
    try:
        now = datetime.now(UTC)
        good = [simulator.grant() for _ in range(3)]
        lines = [
            "id,user_id,account_id,companyid,access_token,refresh_token,token_expires_at,"
            "reconnect_token_at,created_at,updated_at,plan"
        ]
        for n, grant in enumerate(good, start=1):
            # The first keeps a live access token: only --verify refreshes it.
            access = grant["access_token"] if n == 1 else "NULL"
            expires = (now + timedelta(minutes=40)).strftime("%Y-%m-%d %H:%M:%S") if n == 1 else ""
            lines.append(
                f"{n},{n * 10},{100 + n},{grant['realm_id']},{access},{grant['refresh_token']},"
                f"{expires},NULL,2023-01-01 10:00:00,2024-01-01 10:00:00,gold"
            )
        lines.append(
            "4,40,104,9130350,NULL,rt-rotated-away-long-ago,NULL,NULL,2023-01-01,2024-01-01,"
        )
        lines.append("5,50,105,9130351,NULL,NULL,NULL,NULL,2023-01-01,2024-01-01,gold")
        path = tmp_path / "qbo_accounts.csv"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

        # A dry run checks every row, stores nothing and calls no one, --verify or not.
        calls = len(simulator.log())
        result = cli("import", "--dry-run", "--verify", str(path), config=daemon.config)
        assert result.returncode == 1  # row 5 is bad
        assert result.stdout.splitlines()[0] == (
            "ignored columns (not used by qbo-daemon): user_id, plan"
        )
        assert "nothing verified in a dry run" in result.stderr
        assert len(simulator.log()) == calls
        status, _ = http("GET", f"{daemon.api_url}/v1/accounts/101", key=daemon.api_key)
        assert status == 404

        result = cli("import", "--verify", str(path), config=daemon.config)
        assert result.returncode == 1, result.stderr
        out = result.stdout.splitlines()
        assert out[0] == "ignored columns (not used by qbo-daemon): user_id, plan"
        assert re.fullmatch(r"line 2: imported 101, next refresh in \d+m; verified: ok", out[1])
        assert out[2] == "line 3: imported 102, refreshing now; verified: ok"
        assert out[3] == "line 4: imported 103, refreshing now; verified: ok"
        assert out[4] == (
            "line 5: imported 104, refreshing now; verified: needs_reconnect (Intuit refused "
            "the grant (invalid_grant: Incorrect or invalid refresh token)): the user must "
            "reconnect (qbo-daemon connect 104)"
        )
        assert out[5] == "line 6: skipped 105: refresh_token: required"
        assert out[6:] == [
            "imported 4 of 5 rows, skipped 1",
            "verified 4: 3 ok, 1 needs_reconnect, 0 transient",
        ]
        # Once each: the refresh the import started was joined or read back, not repeated.
        for grant in good:
            assert refresh_calls(simulator, grant["refresh_token"]) == 1
        assert refresh_calls(simulator, "rt-rotated-away-long-ago") == 1
        log = daemon.log.read_text(encoding="utf-8")
        for grant in good:
            assert grant["refresh_token"] not in log
            assert grant["refresh_token"] not in result.stdout + result.stderr
    finally:
        daemon.stop()


def test_import_verify_reports_an_outage_as_transient(simulator: Simulator, tmp_path: Path) -> None:
    daemon, _ = fresh_daemon(simulator, tmp_path / "d")
    try:
        grant = simulator.grant()
        row = {
            "account_id": "outage",
            "realm_id": grant["realm_id"],
            "refresh_token": grant["refresh_token"],
            "access_token": grant["access_token"],
            "token_expires_at": iso(datetime.now(UTC) + timedelta(minutes=40)),
        }
        fault = {"kind": "503", "count": 1, "endpoint": "token"}
        assert http("POST", f"{simulator.url}/_sim/faults", fault)[0] == 200
        result = cli(
            "import", "--verify", "--json", "-", config=daemon.config, stdin=json.dumps(row)
        )
        assert result.returncode == 1, result.stderr
        report = json.loads(result.stdout)
        [entry] = report["imported"]
        assert entry["verify"]["result"] == "transient"
        assert "503" in entry["verify"]["error"]
        assert report["ignored_columns"] == []
        # The daemon retries on its own.
        wait_until(lambda: settled_ok(daemon, "outage"), what="outage retried")
    finally:
        daemon.stop()


def settled_ok(daemon: Daemon, account_id: str) -> bool:
    status, body = http("GET", f"{daemon.api_url}/v1/accounts/{account_id}", key=daemon.api_key)
    return status == 200 and body["failure_count"] == 0 and body["version"] >= 3


# -- the runbook, on PostgreSQL --------------------------------------------------------------------

CLASSIC_TABLE = """
CREATE TABLE qbo_accounts (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL UNIQUE,
    user_id bigint,
    companyid varchar,
    access_token text,
    refresh_token text,
    token_expires_at timestamp,
    reconnect_token_at timestamp,
    created_at timestamp NOT NULL,
    updated_at timestamp NOT NULL,
    company_name varchar
);
"""


def test_the_runbook_moves_a_classic_table_in_and_back_out(
    simulator: Simulator, tmp_path: Path
) -> None:
    with postgres() as pg:
        grants = [simulator.grant() for _ in range(3)]
        now = datetime.now(UTC).replace(tzinfo=None)
        values = []
        for n, grant in enumerate(grants, start=1):
            values.append(
                f"({200 + n}, {n}, '{grant['realm_id']}', '{grant['access_token']}', "
                f"'{grant['refresh_token']}', '{now + timedelta(minutes=30)}', "
                f"'{now + timedelta(minutes=20)}', '2023-01-01 10:00', '{now}', 'Co {n}')"
            )
        values.append(f"(204, 4, '9130352', NULL, NULL, NULL, NULL, '2023-01-01', '{now}', 'Co 4')")
        insert = (
            "INSERT INTO qbo_accounts (account_id, user_id, companyid, access_token, "
            "refresh_token, token_expires_at, reconnect_token_at, created_at, updated_at, "
            "company_name) VALUES "
        )
        pg.psql(CLASSIC_TABLE + insert + ", ".join(values) + ";")

        # 2. Export the table, with the runbook's own \copy.
        pg.psql(sql_block("TO 'qbo_accounts.csv'"))
        exported = pg.file("qbo_accounts.csv")

        # 3. Import with verify into a daemon.
        daemon, key = fresh_daemon(simulator, tmp_path / "d")
        try:
            result = cli("import", "--verify", str(exported), config=daemon.config)
            assert result.returncode == 1, result.stderr  # the row without a token
            assert result.stdout.splitlines()[0] == (
                "ignored columns (not used by qbo-daemon): user_id, company_name"
            )
            assert "line 5: skipped 204: refresh_token: required" in result.stdout
            assert "verified 3: 3 ok, 0 needs_reconnect, 0 transient" in result.stdout
            for grant in grants:
                assert refresh_calls(simulator, grant["refresh_token"]) == 1
            # An account first connected through the daemon.
            grant = simulator.grant()
            body = {"realm_id": grant["realm_id"], "refresh_token": grant["refresh_token"]}
            status, _ = http(
                "PUT", f"{daemon.api_url}/v1/accounts/205/tokens", body, daemon.api_key
            )
            assert status == 201
            wait_until(lambda: settled(daemon, "205"), what="205 refreshed")
            # Rotate everything once more, so the table's tokens are truly stale.
            for account_id in ("201", "202", "203", "205"):
                assert cli("refresh", account_id, config=daemon.config).returncode == 0
        finally:
            daemon.stop()
        held = connections(tmp_path / "d" / "qbo-daemon.sqlite3", key)

        # 6. Roll back: export under the lock, then the runbook's SQL.
        export_file = pg.directory / "qbo-export.csv"
        result = cli(
            "export", "--include-secrets", "--output", str(export_file), config=daemon.config
        )
        assert result.returncode == 0, result.stderr
        pg.file("qbo-export.csv")
        pg.psql(sql_block("qbo_export"))
        table = pg.psql(
            "SELECT account_id, companyid, access_token, refresh_token, token_expires_at, "
            "reconnect_token_at, company_name FROM qbo_accounts ORDER BY account_id;"
        )
    rows = {line.split("|")[0]: line.split("|") for line in table.splitlines()}
    assert set(rows) == {"201", "202", "203", "204", "205"}
    for account_id in ("201", "202", "203", "205"):
        ours = held[account_id]
        _, realm, access, refresh, expires, due, _ = rows[account_id]
        assert (realm, access, refresh) == (
            ours["realm_id"],
            ours["access_token"],
            ours["refresh_token"],
        )
        # timestamp columns: the UTC wall time, as Rails keeps it.
        assert datetime.fromisoformat(expires) == wall_time(ours["token_expires_at"])
        assert datetime.fromisoformat(due) == wall_time(ours["reconnect_token_at"])
    assert rows["201"][6] == "Co 1"  # the app's own columns untouched
    assert rows["204"][3] == ""  # not in the daemon: left as it was
