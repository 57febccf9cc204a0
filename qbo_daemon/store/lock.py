"""The database lock: one daemon per database file."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import TextIO

from qbo_daemon.core.errors import DatabaseLockedError


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``: one daemon per database.

    The kernel drops the lock when the process dies, even by ``kill -9``.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + ".lock")
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

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
