"""Start-up as an operator meets it: no key, a key left beside the data, a wrong key."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import EncryptionKey, generate_key
from tests.conftest import StartDaemon
from tests.figures import write_figures

_QBO = [sys.executable, "-m", "qbo_daemon"]
_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("QBO_", "CREDENTIALS_"))}


def _config_without_keys(simulator: IntuitSimulator, data_dir: Path) -> str:
    text = simulator_config_text(
        simulator,
        data_dir=data_dir,
        api_port=free_port(),
        callback_port=free_port(),
        api_key="start-test-api-key",
        encryption_key="unused",
    )
    return text.replace('encryption_keys = ["unused"]\n', "")


async def test_without_a_key_run_exits_2_saying_how_to_make_one_apart_from_the_data(
    simulator: IntuitSimulator, tmp_path: Path
) -> None:
    """No key beside the database: ``run`` refuses, and its message is a recipe that works."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text(_config_without_keys(simulator, data_dir), encoding="utf-8")

    began = time.monotonic()
    refused = await _run(config)
    took = time.monotonic() - began
    assert refused.returncode == 2
    [message] = refused.stderr.strip().splitlines()
    key_file = tmp_path / "etc" / "encryption_key"
    command = f"(umask 077; qbo-daemon keys generate > {key_file})"
    assert message.startswith("qbo-daemon: error: [storage] key_file: no encryption key")
    assert command in message
    assert f'key_file = "{key_file}" under [storage]' in message
    left = sorted(p.name for p in data_dir.iterdir())
    assert left == []  # no key, no database, no lock

    # Follow the message to the letter, and the daemon starts.
    shell = command.replace("qbo-daemon", f"{sys.executable} -m qbo_daemon")
    await asyncio.to_thread(subprocess.run, ["/bin/sh", "-c", shell], check=True, env=_ENV)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    text = config.read_text().replace("[storage]\n", f'[storage]\nkey_file = "{key_file}"\n')
    config.write_text(text, encoding="utf-8")
    await _run_briefly(config)
    assert not [p for p in data_dir.iterdir() if p.suffix == ".key"]
    write_figures(
        {
            "keys-refused": f"exit status {refused.returncode} after {took:.1f} s, "
            f"{len(left)} files left in the data directory; the printed command, run as "
            "printed, made a 0600 key the daemon then started with"
        }
    )


async def test_a_key_file_an_earlier_version_left_beside_the_database_is_not_read(
    simulator: IntuitSimulator, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    legacy = data_dir / "qbo-daemon.sqlite3.key"
    legacy.write_text(generate_key() + "\n", encoding="utf-8")
    config = data_dir / "config.toml"
    config.write_text(_config_without_keys(simulator, data_dir), encoding="utf-8")

    refused = await _run(config)
    assert refused.returncode == 2
    assert f"{legacy} holds the key an earlier qbo-daemon made" in refused.stderr
    assert f"mv {legacy} /etc/qbo-daemon/encryption_key" in refused.stderr  # not beside it
    assert "Do not make a new key" in refused.stderr
    assert legacy.read_text().strip() not in refused.stderr


async def test_the_demo_keeps_its_own_throw_away_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    for _ in range(2):  # the second run reads what the first stored
        result = await asyncio.to_thread(
            subprocess.run,
            [*_QBO, "demo", "--accounts", "1", "--duration", "4", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            env=_ENV,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert not [p for p in data_dir.iterdir() if p.suffix == ".key"]
    demo = data_dir / "demo.toml"
    assert stat.S_IMODE(demo.stat().st_mode) == 0o600
    assert "encryption_keys = [" in demo.read_text()


async def test_a_wrong_key_is_a_clear_start_up_error(
    daemon_factory: StartDaemon, tmp_path: Path
) -> None:
    running = await daemon_factory()
    assert await running.connect("acme") == 200
    await running.shutdown()
    original = EncryptionKey.from_text(running.encryption_key)

    text = running.config_path.read_text()
    wrong = generate_key()
    running.config_path.write_text(text.replace(running.encryption_key, wrong))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "qbo_daemon", "run", "--config", str(running.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 2  # a configuration mistake: systemd does not restart it
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qbo-daemon: error: ")
    assert original.key_id in last
    assert "Traceback" not in result.stderr
    assert wrong not in result.stderr + result.stdout


async def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [*_QBO, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_ENV,
    )


async def _run_briefly(config: Path) -> list[dict[str, object]]:
    """Run the daemon until it is ready, stop it with SIGTERM, return its JSON log lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "qbo_daemon",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(60):
            while True:
                raw = await process.stdout.readline()
                assert raw, f"the daemon exited early: {lines}"
                line = json.loads(raw)
                lines.append(line)
                if line.get("event") == "daemon.started":
                    break
        process.terminate()
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines.extend(json.loads(raw) for raw in rest.splitlines() if raw.strip())
    assert process.returncode == 0
    return lines
