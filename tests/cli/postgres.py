"""A throwaway PostgreSQL server for the migration tests: the classic cron's own database.

It runs from the Debian binaries when they are installed (``initdb``,
``pg_ctl``, ``psql``), on a Unix socket only, in a fresh directory; a test
that needs one skips when they are not. PostgreSQL refuses to run as root,
so as root the server and ``psql`` run as ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TIMEOUT = 60


def _binaries() -> dict[str, str] | None:
    found = {}
    for name in ("initdb", "pg_ctl", "psql"):
        path = shutil.which(name)
        if path is None:
            versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
            path = str(versions[-1]) if versions else None
        if path is None:
            return None
        found[name] = path
    return found


@dataclass
class Postgres:
    directory: Path  # the socket and the files psql reads live here
    binaries: dict[str, str]

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "nobody", "--", *argv] if os.geteuid() == 0 else argv

    def psql(self, script: str) -> str:
        """Run ``script`` (SQL and psql meta-commands) and return what it printed."""
        result = subprocess.run(
            self._as_owner(
                [
                    self.binaries["psql"],
                    "-h",
                    str(self.directory),
                    "-d",
                    "postgres",
                    "-X",
                    "-q",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                ]
            ),
            input=script,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            cwd=self.directory,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def file(self, name: str, text: str | None = None) -> Path:
        """A file in the server's directory (readable and writable by psql)."""
        path = self.directory / name
        if text is not None:
            path.write_text(text, encoding="utf-8")
        if os.geteuid() == 0 and path.exists():
            shutil.chown(path, "nobody")
        return path


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    binaries = _binaries()
    if binaries is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl, psql) is not installed")
    # Not under pytest's tmp_path: its parents are private to root, and nobody must get in.
    directory = Path(tempfile.mkdtemp(prefix="qbo-pg-"))
    data = directory / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "nobody")
        server = Postgres(directory, binaries)
        run = server._as_owner
        subprocess.run(
            run([binaries["initdb"], "-D", str(data), "-A", "trust", "-U", "nobody"]),
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        )
        options = f"-k {directory} -c listen_addresses=''"
        subprocess.run(
            run(
                [
                    binaries["pg_ctl"],
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(directory / "server.log"),
                    "-w",
                    "start",
                ]
            ),
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        )
        try:
            yield server
        finally:
            subprocess.run(
                run([binaries["pg_ctl"], "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
