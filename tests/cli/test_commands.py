"""The management CLI as a person runs it: ``qbo-daemon`` subprocesses against a daemon
subprocess (``qbo-daemon run``) and a simulator subprocess (``qbo-daemon simulator``).

One simulator and one daemon serve the whole module; the key rotation test
starts its own daemon, as it restarts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import EncryptionKey, generate_key

QBO = [sys.executable, "-m", "qbo_daemon"]
ROOT = Path(__file__).resolve().parents[2]
# The CLI must not pick up a developer's real settings.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("QBO_", "CREDENTIALS_"))}


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class Daemon:
    config: Path
    api_url: str
    api_key: str
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@dataclass
class Simulator:
    url: str
    process: subprocess.Popen[bytes]

    def grant(self) -> dict[str, Any]:
        status, body = http("POST", f"{self.url}/_sim/grants", {})
        assert status == 200, body
        return dict(body)

    def log(self) -> list[dict[str, Any]]:
        return list(http("GET", f"{self.url}/_sim/log")[1]["entries"])


def write_config(directory: Path, simulator_url: str, keys: list[str]) -> tuple[Path, str, str]:
    """A daemon configuration for the simulator; returns (path, api url, api key)."""
    stand_in = IntuitSimulator()
    stand_in.base_url = simulator_url
    api_port = free_port()
    api_key = "cli-test-key-" + generate_key()[:12]
    text = simulator_config_text(
        stand_in,
        data_dir=directory,
        api_port=api_port,
        callback_port=free_port(),
        api_key=api_key,
        encryption_key=keys[0],
    ).replace(f'encryption_keys = ["{keys[0]}"]', f"encryption_keys = {json.dumps(keys)}")
    path = directory / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path, f"http://127.0.0.1:{api_port}", api_key


def start_daemon(config: Path, api_url: str, api_key: str) -> Daemon:
    log = config.with_name(f"daemon-{time.monotonic_ns()}.log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*QBO, "run", "--config", str(config)], stdout=out, stderr=out, env=ENV, cwd=ROOT
        )
    daemon = Daemon(config, api_url, api_key, log, process)
    try:
        wait_until(
            lambda: process.poll() is not None or answers(f"{api_url}/healthz"),
            what="daemon start",
        )
    except AssertionError:
        daemon.stop()
        raise
    assert process.poll() is None, log.read_text()
    return daemon


def cli(*args: str, config: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QBO, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        input=stdin,
        env=ENV,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "simulator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*QBO, "simulator", "--port", str(port)], stdout=out, stderr=out, env=ENV, cwd=ROOT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{url}/_sim/stats"), what="simulator start")
        yield Simulator(url, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def daemon(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config, api_url, api_key = write_config(
        tmp_path_factory.mktemp("daemon"), simulator.url, [generate_key()]
    )
    running = start_daemon(config, api_url, api_key)
    try:
        yield running
    finally:
        running.stop()


def account(daemon: Daemon, account_id: str) -> dict[str, Any]:
    status, body = http("GET", f"{daemon.api_url}/v1/accounts/{account_id}", key=daemon.api_key)
    assert status == 200, body
    return dict(body)


def refreshed(daemon: Daemon, account_id: str) -> bool:
    return bool(account(daemon, account_id)["next_refresh_at"]) and (
        account(daemon, account_id)["version"] >= 2
    )


# -- not running ----------------------------------------------------------------------------


def test_a_daemon_that_is_not_running_is_one_clear_line(tmp_path: Path) -> None:
    config, api_url, _ = write_config(tmp_path, "http://127.0.0.1:9", [generate_key()])
    for args in (["accounts", "list"], ["refresh", "acme"], ["disconnect", "acme"]):
        result = cli(*args, config=config)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert result.stderr == f"qbo-daemon: error: qbo-daemon is not running at {api_url}\n"


# -- import, list, show -----------------------------------------------------------------------


def test_import_a_classic_qbo_accounts_csv_then_list_and_show(
    daemon: Daemon, simulator: Simulator, tmp_path: Path
) -> None:
    grants = [simulator.grant() for _ in range(3)]
    header = (
        "id,access_token,refresh_token,companyid,account_id,created_at,updated_at,"
        "token_expires_at,reconnect_token_at"
    )
    rows = [
        f"{n},{g['access_token']},{g['refresh_token']},{g['realm_id']},csv-{n},"
        "2023-01-01 10:00:00,2023-06-01 10:00:00,2023-06-01 11:00:00,2023-06-01 10:50:00"
        for n, g in enumerate(grants, start=1)
    ]
    rows.insert(1, "9,,,4620816365,csv-bad,2023-01-01 10:00:00,2023-06-01 10:00:00,,")
    path = tmp_path / "qbo_accounts.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")

    result = cli("import", str(path), config=daemon.config)
    assert result.returncode == 1, result.stderr  # one row skipped
    assert result.stdout.splitlines() == [
        "line 2: imported csv-1, refreshing now",
        "line 3: skipped csv-bad: refresh_token: required",
        "line 4: imported csv-2, refreshing now",
        "line 5: imported csv-3, refreshing now",
        "imported 3 of 4 rows, skipped 1",
    ]
    for n in (1, 2, 3):
        wait_until(lambda n=n: refreshed(daemon, f"csv-{n}"), what=f"csv-{n} refreshed")

    result = cli("accounts", "list", config=daemon.config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ACCOUNT",
        "REALM",
        "STATUS",
        "EXPIRES",
        "IN",
        "NEXT",
        "REFRESH",
        "FAILURES",
        "LAST",
        "ERROR",
    ]
    table = {line.split()[0]: line for line in lines[1:] if line.startswith("csv-")}
    assert set(table) == {"csv-1", "csv-2", "csv-3"}
    realm = grants[0]["realm_id"]
    assert re.match(rf"csv-1\s+{realm}\s+active\s+(59m|1h)\s+in \d+m\s+0\s+-$", table["csv-1"])
    assert re.search(r"^\d+ accounts: .*\d+ active", result.stdout, re.M)
    for grant in grants:
        for secret in (grant["access_token"], grant["refresh_token"]):
            assert secret not in result.stdout

    listing = json.loads(cli("accounts", "list", "--json", config=daemon.config).stdout)
    assert {a["account_id"] for a in listing["accounts"]} >= {"csv-1", "csv-2", "csv-3"}

    result = cli("accounts", "show", "csv-2", config=daemon.config)
    assert result.returncode == 0
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())
    assert fields["account"] == "csv-2"
    assert fields["status"] == "active"
    assert fields["realm id"] == grants[1]["realm_id"]
    assert fields["next refresh"].startswith("in ")

    again = cli("import", str(path), "--json", config=daemon.config)
    report = json.loads(again.stdout)
    assert report["imported"] == []
    assert [(s["line"], s["reason"]) for s in report["skipped"]] == [
        (2, "already exists; not replaced"),
        (3, "required"),
        (4, "already exists; not replaced"),
        (5, "already exists; not replaced"),
    ]


def test_import_json_lines_from_stdin_dry_run_and_a_bad_file(
    daemon: Daemon, simulator: Simulator, tmp_path: Path
) -> None:
    grant = simulator.grant()
    line = {
        "account_id": "jl-1",
        "realm_id": grant["realm_id"],
        "refresh_token": grant["refresh_token"],
    }
    text = json.dumps(line) + "\n" + json.dumps({**line, "account_id": "jl-2"}) + "\n"
    result = cli("import", "-", "--dry-run", "--json", config=daemon.config, stdin=text)
    report = json.loads(result.stdout)
    assert report["imported"] == []
    assert [s["field"] for s in report["skipped"]] == ["refresh_token", "refresh_token"]

    result = cli("import", "-", "--dry-run", config=daemon.config, stdin=json.dumps(line) + "\n")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "line 1: would import jl-1",
        "would import 1 of 1 rows, skipped 0 (dry run: nothing was stored)",
    ]
    status, _ = http("GET", f"{daemon.api_url}/v1/accounts/jl-1", key=daemon.api_key)
    assert status == 404

    bad = tmp_path / "accounts.csv"
    bad.write_text("account,realm_id,refresh_token\n", encoding="utf-8")
    result = cli("import", str(bad), config=daemon.config)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "qbo-daemon: error: line 1: missing column(s) account_id (companyid is taken as "
        "realm_id); columns not used: account"
    )


def test_an_export_with_one_placeholder_token_prints_a_bounded_report(
    daemon: Daemon, simulator: Simulator, tmp_path: Path
) -> None:
    """Thousands of rows refused for one reason: fifty lines and a count, not thousands."""
    grant = simulator.grant()
    rows = 3000
    export = tmp_path / "qbo_accounts.csv"
    export.write_text(
        "account_id,companyid,refresh_token\n"
        + "".join(f"ph-{n},{grant['realm_id']},PLACEHOLDER\n" for n in range(rows)),
        encoding="utf-8",
    )
    result = cli("import", str(export), config=daemon.config)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 52
    assert lines[0] == (
        "line 2: skipped ph-0: refresh_token: the same refresh token as another row "
        f"(also at 3, 4, 5, 6, 7 and {rows - 6:,} more); every copy is refused"
    )
    assert lines[1] == (
        "line 3: skipped ph-1: refresh_token: the same refresh token as another row "
        "(first at 2); every copy is refused"
    )
    assert (
        lines[-2] == f"... and {rows - 50:,} more skipped rows not shown (--json lists every row)"
    )
    assert lines[-1] == f"imported 0 of {rows} rows, skipped {rows}"

    listed = json.loads(cli("import", str(export), "--json", config=daemon.config).stdout)
    assert len(listed["skipped"]) == rows


# -- refresh, connect, disconnect ----------------------------------------------------------


def test_refresh_connect_and_disconnect(daemon: Daemon, simulator: Simulator) -> None:
    grant = simulator.grant()
    body = {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"]}
    status, _ = http("PUT", f"{daemon.api_url}/v1/accounts/ops/tokens", body, daemon.api_key)
    assert status == 201
    wait_until(lambda: refreshed(daemon, "ops"), what="ops refreshed")

    result = cli("refresh", "ops", config=daemon.config)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"refreshed ops: access token expires in (59m|1h) \(\S+Z\), next refresh in \d+m\n",
        result.stdout,
    )

    result = cli("connect", "newco", config=daemon.config)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{simulator.url}/connect/oauth2?")
    assert "state=" in result.stdout
    result = cli("connect", "mover", "--allow-realm-change", config=daemon.config)
    assert result.returncode == 0, result.stderr
    database = daemon.config.parent / "qbo-daemon.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as db:
        flags = db.execute(
            "SELECT account_id, allow_realm_change FROM oauth_states "
            "WHERE account_id IN ('newco', 'mover') ORDER BY account_id"
        ).fetchall()
    assert flags == [("mover", 1), ("newco", 0)]

    stored_before = [e for e in simulator.log() if e["endpoint"] == "revoke"]
    result = cli("disconnect", "ops", config=daemon.config)
    assert (result.returncode, result.stdout) == (
        0,
        "disconnected ops: tokens forgotten; revoked at Intuit\n",
    )
    revokes = [e for e in simulator.log() if e["endpoint"] == "revoke"][len(stored_before) :]
    assert [e["status"] for e in revokes] == [200]
    assert account(daemon, "ops")["status"] == "disconnected"

    result = cli("refresh", "ops", config=daemon.config)
    assert result.returncode == 1
    assert result.stderr.startswith("qbo-daemon: error: account 'ops' is disconnected")
    assert result.stderr.count("\n") == 1

    log = daemon.log.read_text(encoding="utf-8")
    assert '"event": "account.revoked"' in log
    assert grant["refresh_token"] not in log

    result = cli("accounts", "show", "ghost", config=daemon.config)
    assert (result.returncode, result.stderr) == (
        1,
        "qbo-daemon: error: no account 'ghost' (404 not_found)\n",
    )
    result = cli("refresh", "-bad", config=daemon.config)
    assert result.returncode == 2


# -- the host-app snippets in docs/host-apps.md, run for real -------------------------------


def _snippet(language: str) -> str:
    text = (ROOT / "docs" / "host-apps.md").read_text(encoding="utf-8")
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    return next(block for block in blocks if "/token" in block)


def test_the_documented_snippets_fetch_a_token(
    daemon: Daemon, simulator: Simulator, tmp_path: Path
) -> None:
    grant = simulator.grant()
    body = {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"]}
    status, _ = http("PUT", f"{daemon.api_url}/v1/accounts/doc-1/tokens", body, daemon.api_key)
    assert status == 201
    env = {**ENV, "QBO_DAEMON_URL": daemon.api_url, "QBO_API_KEY": daemon.api_key}

    result = subprocess.run(
        ["bash", "-c", _snippet("sh")],
        capture_output=True,
        text=True,
        env={**env, "ACCOUNT_ID": "doc-1"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["realm_id"] == grant["realm_id"]

    script = tmp_path / "host_app.py"
    script.write_text(
        _snippet("python")
        + "\nimport json, sys\n"
        + "print(json.dumps(quickbooks_token('doc-1')))\n"
        + "try:\n    quickbooks_token('ghost')\nexcept ReconnectNeeded as exc:\n"
        + "    print(exc.url)\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    token_line, url_line = result.stdout.splitlines()
    assert json.loads(token_line)["realm_id"] == grant["realm_id"]
    assert url_line.startswith(f"{simulator.url}/connect/oauth2?")

    if shutil.which("node") is None:
        return
    script = tmp_path / "host_app.mjs"
    script.write_text(
        _snippet("javascript")
        + "\nconsole.log(JSON.stringify(await quickbooksToken('doc-1')));\n"
        + "try { await quickbooksToken('ghost'); } catch (e) { console.log(e.url); }\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    token_line, url_line = result.stdout.splitlines()
    assert json.loads(token_line)["realm_id"] == grant["realm_id"]
    assert url_line.startswith(f"{simulator.url}/connect/oauth2?")


def test_the_daemon_log_shows_no_token(daemon: Daemon, simulator: Simulator) -> None:
    log = daemon.log.read_text(encoding="utf-8")
    assert '"event": "refresh.succeeded"' in log
    entries = simulator.log()
    secrets = [e["presented_refresh_token"] for e in entries]
    secrets += [e["issued_refresh_token"] for e in entries]
    assert any(secrets)
    for secret in filter(None, secrets):
        assert secret not in log


# -- key rotation ------------------------------------------------------------------------------


def test_keys_rotate_live_then_offline_then_the_old_keys_are_dropped(
    simulator: Simulator, tmp_path: Path
) -> None:
    first, second, third = generate_key(), generate_key(), generate_key()
    config, api_url, api_key = write_config(tmp_path, simulator.url, [first])
    running = start_daemon(config, api_url, api_key)
    try:
        rows = []
        for n in range(25):
            grant = simulator.grant()
            rows.append(
                {
                    "account_id": f"k{n}",
                    "realm_id": grant["realm_id"],
                    "refresh_token": grant["refresh_token"],
                }
            )
        result = cli("import", "-", config=config, stdin="\n".join(map(json.dumps, rows)))
        assert result.returncode == 0, result.stdout + result.stderr

        config.write_text(
            config.read_text().replace(f'["{first}"]', f'["{second}", "{first}"]'),
            encoding="utf-8",
        )
        result = cli("keys", "rotate", config=config)
        assert result.returncode == 1
        assert "has not read the new [storage] encryption_keys yet" in result.stderr

        running.process.send_signal(signal.SIGHUP)
        wait_until(lambda: '"daemon.reloaded"' in running.log.read_text(), what="reload")
        result = cli("keys", "rotate", "--batch", "10", config=config)
        assert result.returncode == 0, result.stderr
        assert "re-encrypted 10 of 25 rows" in result.stderr.splitlines()[0]
        assert result.stderr.splitlines()[-1] == "re-encrypted 25 of 25 rows"
        second_id = EncryptionKey.from_text(second).key_id
        assert result.stdout.startswith(
            f"re-encrypted 25 rows under key id {second_id} (by the daemon); 0 left"
        )
    finally:
        running.stop()

    config.write_text(
        config.read_text().replace(f'"{second}", "{first}"', f'"{third}", "{second}"'),
        encoding="utf-8",
    )
    result = cli("keys", "rotate", "--json", config=config)
    assert result.returncode == 0, result.stderr
    assert "qbo-daemon is not running" in result.stderr
    assert json.loads(result.stdout) == {
        "reencrypted": 25,
        "remaining": 0,
        "primary_key_id": EncryptionKey.from_text(third).key_id,
        "via": "database",
    }

    config.write_text(
        config.read_text().replace(f'"{third}", "{second}"', f'"{third}"'), encoding="utf-8"
    )
    running = start_daemon(config, api_url, api_key)
    try:
        listing = json.loads(cli("accounts", "list", "--json", config=config).stdout)
        assert len(listing["accounts"]) == 25
        status, token = http("GET", f"{api_url}/v1/accounts/k7/token", key=api_key)
        assert (status, token["realm_id"]) == (200, rows[7]["realm_id"])
    finally:
        running.stop()
