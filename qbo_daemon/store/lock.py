"""The database lock: one daemon per database file.

The lock file also says where the daemon that holds it answers (:meth:`DatabaseLock.advertise`,
read by :func:`advertised_api`): after a reload that changed ``[api] listen`` the daemon keeps
its old address until it restarts, and the CLI, which reads the changed file, finds it there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import TextIO

from qbo_daemon.core.errors import DatabaseLockedError


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``: one daemon per database.

    The kernel drops the lock when the process dies, even by ``kill -9``.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = lock_path(database)
        self._file: TextIO | None = None

    def acquire(self) -> None:
        # No mkdir: a database path in a missing directory is a mistake to report.
        handle = self.path.open("a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DatabaseLockedError(str(self.database)) from None
        self._file = handle

    def advertise(self, api_url: str) -> None:
        """Write where the holder's token API answers into the lock file (best effort)."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.truncate(0)
            self._file.write(json.dumps({"pid": os.getpid(), "api": api_url}) + "\n")
            self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)  # the address was the holder's, and it is leaving
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def advertised_api(database: Path) -> str | None:
    """The API URL the daemon holding ``database``'s lock wrote, or None (no daemon holds it)."""
    try:
        handle = lock_path(database).open("r", encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a daemon runs, and what it wrote is current
        else:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return None  # no one holds it: whatever it says is stale
        try:
            data = json.loads(handle.read() or "null")
        except ValueError:
            return None
    api = data.get("api") if isinstance(data, dict) else None
    return api if isinstance(api, str) and api.startswith("http") else None
