"""An operator's day with the CLI: what it prints must be true, and nothing else.

Real processes (the helpers of ``test_commands``): a ``qbo-daemon run`` and a
``qbo-daemon simulator`` subprocess, and the CLI as a subprocess, in a shell
pipe where the test is about pipes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qbo_daemon.cli.demo import free_port
from qbo_daemon.config.locate import DEFAULT_CONFIG_PATH, locate_config
from qbo_daemon.core.errors import ConfigError
from qbo_daemon.store.crypto import generate_key
from tests.cli.test_commands import (
    ENV,
    QBO,
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


def qbo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI exactly as typed: no --config added."""
    return subprocess.run(
        [*QBO, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else ENV,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def details(text: str) -> list[tuple[str, str]]:
    """``accounts show`` as (field, value) pairs, in order."""
    pairs = [re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines()]
    return [(pair[0], pair[1]) for pair in pairs]


def import_account(daemon: Daemon, simulator: Simulator, account_id: str) -> dict[str, Any]:
    grant = simulator.grant()
    body = {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"]}
    status, _ = http(
        "PUT", f"{daemon.api_url}/v1/accounts/{account_id}/tokens", body, daemon.api_key
    )
    assert status == 201
    wait_until(lambda: account(daemon, account_id)["version"] >= 2, what=f"{account_id} refreshed")
    return grant


def account(daemon: Daemon, account_id: str) -> dict[str, Any]:
    status, body = http("GET", f"{daemon.api_url}/v1/accounts/{account_id}", key=daemon.api_key)
    assert status == 200, body
    return dict(body)


# -- the configuration file ------------------------------------------------------------------


def test_a_forgotten_config_says_so(daemon: Daemon) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    for args in (["accounts", "list"], ["export"], ["check-config"], ["run"]):
        result = qbo(*args)
        assert (result.returncode, result.stdout) == (2, ""), args
        assert result.stderr == (
            "qbo-daemon: error: no configuration file: pass --config PATH, set "
            f"QBO_DAEMON_CONFIG=PATH, or create {DEFAULT_CONFIG_PATH}\n"
        )

    # QBO_DAEMON_CONFIG stands in for --config.
    result = qbo("accounts", "list", env={**ENV, "QBO_DAEMON_CONFIG": str(daemon.config)})
    assert result.returncode == 0, result.stderr
    assert "--config" in qbo("accounts", "list", "--help").stdout


def test_the_default_configuration_path(tmp_path: Path) -> None:
    default = tmp_path / "config.toml"
    with pytest.raises(ConfigError, match="no configuration file"):
        locate_config(None, {}, default=default)
    default.write_text("", encoding="utf-8")
    assert locate_config(None, {}, default=default) == default
    named = tmp_path / "named.toml"
    assert locate_config(None, {"QBO_DAEMON_CONFIG": str(named)}, default=default) == named
    given = tmp_path / "given.toml"
    assert locate_config(given, {"QBO_DAEMON_CONFIG": str(named)}, default=default) == given


# -- accounts show and list ---------------------------------------------------------------------


def test_accounts_show_and_list_tell_the_truth_about_a_dead_connection(
    daemon: Daemon, simulator: Simulator
) -> None:
    grant = import_account(daemon, simulator, "dying")
    live = details(cli("accounts", "show", "dying", config=daemon.config).stdout)
    assert [name for name, _ in live] == [
        "account",
        "status",
        "realm id",
        "access token",
        "next refresh",
        "refresh token",
        "hard expiry",
        "last refreshed",
        "failures",
        "last error",
        "version",
        "created",
        "updated",
    ]
    assert dict(live)["access token"].startswith("expires in ")

    # The user revokes the app inside QuickBooks: Intuit refuses the refresh token.
    current = [
        e["issued_refresh_token"]
        for e in simulator.log()
        if e["presented_refresh_token"] == grant["refresh_token"] and e["issued_refresh_token"]
    ][-1]
    assert http("POST", f"{simulator.url}/_sim/invalidate", {"refresh_token": current})[0] == 200
    result = cli("refresh", "dying", config=daemon.config)
    assert result.returncode == 1
    assert result.stderr == (
        "qbo-daemon: error: account 'dying' needs the user to reconnect (Intuit refused the "
        "grant (invalid_grant: Token invalid)): qbo-daemon connect dying, then send the user "
        "to the URL it prints\n"
    )

    shown = details(cli("accounts", "show", "dying", config=daemon.config).stdout)
    assert shown == [
        ("account", "dying"),
        ("status", "needs_reconnect"),
        ("realm id", grant["realm_id"]),
        ("access token", "not served: the connection needs the user to reconnect"),
        ("refresh token", "dead: Intuit refused it or it expired (see last error)"),
        ("next refresh", "none until the user reconnects"),
        *[pair for pair in shown if pair[0] in ("last refreshed", "failures")],
        ("last error", "Intuit refused the grant (invalid_grant: Token invalid)"),
        *[pair for pair in shown if pair[0] in ("version", "created", "updated")],
        ("to reconnect", "qbo-daemon connect dying, then send the user to the URL it prints"),
    ]
    listing = cli("accounts", "list", config=daemon.config).stdout.splitlines()
    [row] = [line for line in listing if line.startswith("dying ")]
    assert row.split()[:5] == ["dying", grant["realm_id"], "needs_reconnect", "-", "-"]
    assert (
        "needs_reconnect: the user must connect again: qbo-daemon connect dying, then send "
        "the user to the URL it prints"
    ) in listing

    assert cli("disconnect", "dying", config=daemon.config).returncode == 0
    shown = details(cli("accounts", "show", "dying", config=daemon.config).stdout)
    assert shown[1:6] == [
        ("status", "disconnected"),
        ("realm id", grant["realm_id"]),
        ("access token", "none: disconnected, the tokens were forgotten"),
        ("refresh token", "none: disconnected, the tokens were forgotten"),
        ("next refresh", "none"),
    ]
    assert [name for name, _ in shown].count("hard expiry") == 0
    # The API agrees: a forgotten token has no expiry.
    gone = account(daemon, "dying")
    assert [gone[k] for k in ("token_expires_at", "refresh_token_expires_at")] == [None, None]
    result = cli("refresh", "dying", config=daemon.config)
    assert result.stderr == (
        "qbo-daemon: error: account 'dying' is disconnected (its tokens were forgotten); to "
        "connect it again: qbo-daemon connect dying, then send the user to the URL it prints\n"
    )


# -- pipes ---------------------------------------------------------------------------------------


def test_output_into_head_prints_no_broken_pipe_error(daemon: Daemon, simulator: Simulator) -> None:
    status, body = http("POST", f"{simulator.url}/_sim/grants", {"count": 400})
    assert status == 200
    rows = [
        {
            "account_id": f"pipe-{n:03}",
            "realm_id": g["realm_id"],
            "refresh_token": g["refresh_token"],
        }
        for n, g in enumerate(body["grants"])
    ]
    status, answer = http("POST", f"{daemon.api_url}/v1/import", {"accounts": rows}, daemon.api_key)
    assert (status, len(answer["imported"])) == (200, 400)
    listing = cli("accounts", "list", "--json", config=daemon.config).stdout
    assert len(listing) > 128 * 1024  # well past a pipe's buffer: head leaves while we write

    for command in ("accounts list --json", "accounts list", "export --format jsonl"):
        shell = (
            f"set -o pipefail; {' '.join(QBO)} {command} --config {daemon.config} | head -1; "
            'echo "status=${PIPESTATUS[0]}" >&2'
        )
        result = subprocess.run(
            ["bash", "-c", shell],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert result.stdout.count("\n") == 1, command
        # Nothing but our own status line: no traceback, no "Broken pipe". The JSON is
        # far larger than the pipe holds, so it surely met the closed pipe (141, as a
        # program killed by SIGPIPE); the others may have fit in before head left.
        *before, last = result.stderr.splitlines()
        assert before == [], (command, result.stderr)
        expected = ("status=141",) if "--json" in command else ("status=0", "status=141")
        assert last in expected, command


# -- a reload that needs a restart ---------------------------------------------------------------


def test_a_moved_api_port_needs_a_restart_and_the_cli_still_finds_the_daemon(
    simulator: Simulator, tmp_path: Path
) -> None:
    config, api_url, api_key = write_config(tmp_path, simulator.url, [generate_key()])
    running = start_daemon(config, api_url, api_key)
    try:
        new_port = free_port()
        old = f'listen = "{api_url.removeprefix("http://")}"'
        text = config.read_text(encoding="utf-8")
        assert text.count(old) == 1
        config.write_text(text.replace(old, f'listen = "127.0.0.1:{new_port}"'), encoding="utf-8")
        running.process.send_signal(signal.SIGHUP)

        def warned() -> dict[str, Any] | None:
            for line in running.log.read_text(encoding="utf-8").splitlines():
                if '"daemon.restart_needed"' in line:
                    return dict(json.loads(line))
            return None

        wait_until(lambda: warned() is not None, what="the restart warning")
        warning = warned()
        assert warning is not None
        assert (warning["level"], warning["settings"]) == ("warning", ["[api] listen"])

        result = cli("accounts", "list", config=config)
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            f"qbo-daemon: note: the daemon answers at {api_url}, not at "
            f"http://127.0.0.1:{new_port} ([api] listen): a new address applies when it is "
            "restarted\n"
        )
    finally:
        running.stop()
    # Stopped: the address it left behind is not used.
    time.sleep(0.1)
    result = cli("accounts", "list", config=config)
    assert result.returncode == 1
    assert result.stderr == (
        f"qbo-daemon: error: qbo-daemon is not running at http://127.0.0.1:{new_port}\n"
    )
