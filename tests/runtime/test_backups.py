"""docs/deploy.md's backup commands and the shipped backup timer, run for real.

The commands are taken from the guide and the unit as written, with the
server's paths pointed at temporary directories, against the database of a
running daemon.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import StartDaemon
from tests.harness import RunningDaemon

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy.md"
BACKUP_UNIT = ROOT / "systemd" / "qbo-daemon-backup.service"
BACKUP_TIMER = ROOT / "systemd" / "qbo-daemon-backup.timer"
DATABASE = "/var/lib/qbo-daemon/qbo-daemon.sqlite3"
BACKUPS = "/var/backups/qbo-daemon"

pytestmark = pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 command")


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DEPLOY.read_text(encoding="utf-8"), re.S)


def on_this_machine(text: str, running: RunningDaemon, backups: Path) -> str:
    return text.replace(DATABASE, str(running.database)).replace(BACKUPS, str(backups))


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def connected(daemon_factory: StartDaemon) -> RunningDaemon:
    running = await daemon_factory()
    assert await running.connect("acme") == 200
    return running


def accounts_in(backup: Path) -> list[str]:
    with sqlite3.connect(backup) as db:
        return [row[0] for row in db.execute("SELECT account_id FROM accounts")]


def test_backup_directories_are_created_before_they_are_used() -> None:
    guide = DEPLOY.read_text(encoding="utf-8")
    first = next(line for line in guide.splitlines() if BACKUPS in line)
    assert first.startswith(f"install -d -m 0700 {BACKUPS}"), first


async def test_the_guides_backup_and_its_check_work_with_several_backups(
    daemon_factory: StartDaemon, tmp_path: Path
) -> None:
    running = await connected(daemon_factory)
    backups = tmp_path / "backups"
    [block] = [b for b in sh_blocks() if "PRAGMA integrity_check" in b and "newest=" in b]
    script = on_this_machine(block, running, backups)
    first = await asyncio.to_thread(bash, script)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "ok\n"
    # An older, broken backup beside the good ones must not be what is checked.
    broken = backups / "qbo-daemon-20000101T000000Z.sqlite3"
    broken.write_bytes(b"not a database")
    os.utime(broken, (time.time() - 86_400, time.time() - 86_400))
    time.sleep(1.1)  # the next backup gets the next second's name
    second = await asyncio.to_thread(bash, script)
    assert (second.returncode, second.stdout) == (0, "ok\n"), second.stderr
    made = sorted(backups.glob("qbo-daemon-*.sqlite3"))
    assert len(made) == 3
    for backup in made[1:]:
        assert accounts_in(backup) == ["acme"]


async def test_the_backup_unit_backs_up_checks_and_prunes(
    daemon_factory: StartDaemon, tmp_path: Path
) -> None:
    running = await connected(daemon_factory)
    backups = tmp_path / "backups"
    commands = [
        line.split("=", 1)[1]
        for line in BACKUP_UNIT.read_text(encoding="utf-8").splitlines()
        if line.startswith(("ExecStartPre=", "ExecStart="))
    ]
    assert len(commands) == 4
    old = None
    for command in commands:
        # systemd writes a literal % as %%; the paths are this machine's.
        argv = shlex.split(on_this_machine(command.replace("%%", "%"), running, backups))
        result = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, (command, result.stderr)
        if old is None and backups.is_dir():
            old = backups / "qbo-daemon-20000101T000000Z.sqlite3"
            shutil.copyfile(running.database, old)
            stamp = (datetime.now(UTC) - timedelta(days=20)).timestamp()
            os.utime(old, (stamp, stamp))
    [kept] = backups.glob("qbo-daemon-*.sqlite3")  # the old one was pruned
    assert re.fullmatch(r"qbo-daemon-\d{8}T\d{6}Z\.sqlite3", kept.name)
    assert accounts_in(kept) == ["acme"]
    assert "OnCalendar=hourly" in BACKUP_TIMER.read_text(encoding="utf-8")


def test_the_backup_units_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze")
    result = subprocess.run(
        ["bash", str(ROOT / "systemd" / "check-unit.sh"), str(BACKUP_UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note:" not in result.stderr  # the score in the unit's header is current


async def test_the_guides_downtime_query_reads_the_earliest_refresh_token_expiry(
    daemon_factory: StartDaemon,
) -> None:
    running = await connected(daemon_factory)
    [block] = [b for b in sh_blocks() if "MIN(refresh_token_expires_at)" in b]
    result = await asyncio.to_thread(bash, on_this_machine(block, running, Path("/nonexistent")))
    assert result.returncode == 0, result.stderr
    earliest = datetime.fromisoformat(result.stdout.strip())
    assert timedelta(days=99) < earliest - datetime.now(UTC) < timedelta(days=102)
