"""Start-up as an operator meets it: the development key file and a wrong key."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import EncryptionKey, generate_key
from tests.conftest import StartDaemon


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


async def test_without_keys_a_private_key_file_is_made_once(
    simulator: IntuitSimulator, tmp_path: Path
) -> None:
    data_dir = tmp_path / "dev"
    data_dir.mkdir()
    config = data_dir / "config.toml"
    config.write_text(_config_without_keys(simulator, data_dir), encoding="utf-8")
    key_file = data_dir / "qbo-daemon.sqlite3.key"

    first = await _run_briefly(config)
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    [key_text] = key_file.read_text().split()
    EncryptionKey.from_text(key_text)  # a usable key
    warnings = [line for line in first if line.get("event") == "storage.key_file_created"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert key_text not in json.dumps(first)

    second = await _run_briefly(config)
    assert key_file.read_text().split() == [key_text]  # reused, not replaced
    assert not [line for line in second if line.get("event") == "storage.key_file_created"]


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
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qbo-daemon: error: ")
    assert original.key_id in last
    assert "Traceback" not in result.stderr
    assert wrong not in result.stderr + result.stdout


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
