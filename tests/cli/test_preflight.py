"""Mistakes caught before they bite: ``check-config`` and ``run`` make the same checks.

Each case is a real configuration file on disk and ``qbo-daemon`` as a
subprocess: ``check-config`` must report what ``run`` refuses (exit status 2,
which the systemd unit does not restart), and warn about what is merely risky.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import EncryptionKey, generate_key
from tests.conftest import StartDaemon
from tests.figures import write_figures

QBO = [sys.executable, "-m", "qbo_daemon"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("QBO_", "CREDENTIALS_"))}
LONG_KEY = "preflight-api-key-" + "k" * 20


def config_text(data_dir: Path, *, api_key: str = LONG_KEY, extra: str = "") -> str:
    model = IntuitSimulator()
    model.base_url = "http://127.0.0.1:9"  # nothing is called in these tests
    return simulator_config_text(
        model,
        data_dir=data_dir,
        api_port=free_port(),
        callback_port=free_port(),
        api_key=api_key,
        encryption_key=generate_key(),
        extra=extra,
    )


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def qbo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QBO, *args], capture_output=True, text=True, env=ENV, timeout=timeout, check=False
    )


def problems(stderr: str, severity: str) -> list[str]:
    prefix = f"qbo-daemon: {severity}: "
    return [line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)]


def test_a_database_in_a_missing_directory_is_refused_by_both(tmp_path: Path) -> None:
    config = write(tmp_path / "etc" / "config.toml", config_text(tmp_path / "no-such-dir"))
    checked = qbo("check-config", "--config", str(config))
    ran = qbo("run", "--config", str(config))
    assert (checked.returncode, ran.returncode) == (2, 2)
    [error] = problems(checked.stderr, "error")
    assert error.startswith(f"[storage] path: the directory {tmp_path / 'no-such-dir'} ")
    assert problems(ran.stderr, "error") == [error]
    assert not (tmp_path / "no-such-dir").exists()  # nothing was created


def test_missing_credentials_fail_check_config_as_they_fail_run(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^keys = .*\n", "", config_text(tmp_path / "data"))  # no [api] keys
    (tmp_path / "data").mkdir()
    config = write(tmp_path / "config.toml", text)
    checked = qbo("check-config", "--config", str(config))
    ran = qbo("run", "--config", str(config))
    assert (checked.returncode, ran.returncode) == (2, 2)
    assert any("missing [api] keys" in line for line in problems(checked.stderr, "error"))
    assert problems(ran.stderr, "error") == problems(checked.stderr, "error")


async def test_keys_that_cannot_read_the_database_fail_check_config(
    daemon_factory: StartDaemon,
) -> None:
    running = await daemon_factory()
    assert await running.connect("acme") == 200
    await running.shutdown()
    original = EncryptionKey.from_text(running.encryption_key)
    wrong = generate_key()
    text = running.config_path.read_text().replace(running.encryption_key, wrong)
    config = write(running.config_path, text)

    checked = qbo("check-config", "--config", str(config))
    ran = qbo("run", "--config", str(config))
    assert (checked.returncode, ran.returncode) == (2, 2)
    [error] = problems(checked.stderr, "error")
    assert error.startswith("[storage] encryption_keys: ")
    assert original.key_id in error
    assert problems(ran.stderr, "error") == [error]
    for output in (checked.stdout, checked.stderr, ran.stdout, ran.stderr):
        assert wrong not in output
        assert running.encryption_key not in output

    # With the right key, check-config reads the database and passes.
    write(config, text.replace(wrong, running.encryption_key))
    assert qbo("check-config", "--config", str(config)).returncode == 0


def test_a_listen_address_of_another_machine_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    text = config_text(tmp_path / "data")
    text = text.replace('listen = "127.0.0.1:', 'listen = "192.0.2.1:', 1)  # TEST-NET-1
    config = write(tmp_path / "config.toml", text)
    checked = qbo("check-config", "--config", str(config))
    assert checked.returncode == 2
    [error] = problems(checked.stderr, "error")
    assert error.startswith("[callback] listen: cannot listen on 192.0.2.1:")
    assert error.endswith("not an address of this machine")
    assert problems(qbo("run", "--config", str(config)).stderr, "error") == [error]


def test_risky_settings_are_warned_about_by_check_config_and_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    short_secret = "webhook-secret-short"
    text = config_text(
        data,
        api_key="short-api-key",
        extra=(f'\n[notify]\nwebhook_url = "http://127.0.0.1:9/hook"\nsecret = "{short_secret}"\n'),
    )
    text = text.replace('[api]\nlisten = "127.0.0.1:', '[api]\nlisten = "0.0.0.0:')
    text = text.replace(
        'token_endpoint = "http://127.0.0.1:9/', 'token_endpoint = "http://intuit.example/'
    )
    config = write(tmp_path / "config.toml", text, mode=0o644)

    checked = qbo("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    warnings = problems(checked.stderr, "warning")
    assert problems(checked.stderr, "error") == []
    expected = [
        f"{config} holds [intuit] client_secret, [api] keys, [storage] encryption_keys, "
        "[notify] secret and every user can read it (mode 0644)",
        "[api] listen: 0.0.0.0:",
        "[intuit] token_endpoint: plain http:// to intuit.example",
        "[api] keys: key 1 is shorter than 32 characters",
        "[notify] secret: shorter than 32 characters",
    ]
    assert len(warnings) == len(expected), warnings
    for prefix in expected:
        assert sum(1 for w in warnings if w.startswith(prefix)) == 1, (prefix, warnings)
    assert checked.stderr.splitlines()[-1].endswith("5 warning(s))")
    for secret in ("short-api-key", short_secret):
        assert secret not in checked.stderr

    logged = run_until_ready(config)
    seen = [
        (line["setting"], line["detail"])
        for line in logged
        if line["event"] == "config.setting_flagged"
    ]
    assert all(
        line["level"] == "warning" for line in logged if line["event"] == "config.setting_flagged"
    )
    assert [f"{s}: {d}" if s else d for s, d in seen] == warnings
    for secret in ("short-api-key", short_secret):
        assert secret not in json.dumps(logged)
    write_figures(
        {
            "preflight-warnings": f"{len(warnings)} of {len(expected)} risky settings named, "
            f"the same {len(seen)} lines in `run`'s log at warning level, 0 secrets in either"
        }
    )


def test_a_new_database_is_logged_at_warning_level_with_its_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = write(tmp_path / "config.toml", config_text(data))
    first = run_until_ready(config)
    created = [line for line in first if line["event"] == "storage.database_created"]
    assert [(c["level"], c["path"]) for c in created] == [
        ("warning", str(data / "qbo-daemon.sqlite3"))
    ]
    second = run_until_ready(config)
    assert not [line for line in second if line["event"] == "storage.database_created"]


def run_until_ready(config: Path) -> list[dict[str, object]]:
    """``run`` until ``daemon.started``, then SIGTERM; its JSON log lines."""
    process = subprocess.Popen(
        [*QBO, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**ENV, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[dict[str, object]] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            raw = process.stdout.readline()
            assert raw, f"the daemon exited early: {lines}"
            lines.append(json.loads(raw))
            if lines[-1]["event"] == "daemon.started":
                break
        else:
            pytest.fail("the daemon did not become ready")
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines.extend(json.loads(raw) for raw in rest.splitlines() if raw.strip())
    assert process.returncode == 0
    return lines


def test_check_config_reads_the_database_without_writing_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = write(tmp_path / "config.toml", config_text(data))
    run_until_ready(config)
    database = data / "qbo-daemon.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    assert qbo("check-config", "--config", str(config)).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before
