"""Where the encryption keys come from (the configuration, never a file beside the data).

A key kept beside the database would sit in every backup of it, so the daemon
makes none: without a configured key it refuses to start, and says how to make
one and where to keep it. :func:`verify_database_keys` checks, reading only,
that the keys decrypt an existing database (``check-config`` and ``run``
before anything starts; the running daemon has ``Storage.verify_keys``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from qbo_daemon.core.errors import ConfigError, MissingKeyError, StorageError
from qbo_daemon.core.models import Secret
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.rows import SELECT_ACCOUNTS, SQLITE_FORMS, account_from_row

# Where a key is suggested when nothing better is known (docs/deploy.md's layout).
DEFAULT_KEY_FILE = Path("/etc/qbo-daemon/encryption_key")


def load_cipher(encryption_keys: Sequence[Secret], database: Path) -> Cipher:
    """The configured keys; none is a :class:`ConfigError` that says how to make one."""
    if not encryption_keys:
        raise ConfigError(missing_key_message(database, DEFAULT_KEY_FILE), key="storage")
    return Cipher([EncryptionKey.from_text(key.reveal()) for key in encryption_keys])


def legacy_key_file(database: Path) -> Path:
    """Where earlier versions of qbo-daemon made a development key: beside the database."""
    return database.with_name(database.name + ".key")


def missing_key_message(database: Path, key_file: Path) -> str:
    """What to do when no key is configured: the command, and where the key goes."""
    legacy = legacy_key_file(database)
    if legacy.exists():
        return (
            f"no encryption key configured. {legacy} holds the key an earlier qbo-daemon "
            "made beside the database (so every backup holds it too); move it away from "
            f"the data and point the configuration at it: mv {legacy} {key_file} && "
            f'chmod 600 {key_file}, then key_file = "{key_file}" under [storage]. '
            "Do not make a new key: the stored tokens only decrypt with this one"
        )
    return (
        "no encryption key configured. Make one: (umask 077; qbo-daemon keys generate "
        f'> {key_file}), then set key_file = "{key_file}" under [storage] (or pass it '
        "as the systemd credential encryption_key). Keep it apart from the database "
        f"and its backups, not in {database.parent}"
    )


def verify_database_keys(database: Path, cipher: Cipher) -> int:
    """Check, reading only, that ``cipher`` decrypts the database; returns the accounts seen.

    Every key id in use must be configured, and one row per key id must decrypt.
    A missing database or one without tables yet passes (0 accounts).
    """
    if not database.exists():
        return 0
    uri = f"{database.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            db.row_factory = sqlite3.Row
            if not db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'accounts'"
            ).fetchone():
                return 0
            rows = db.execute(
                "SELECT key_id, MIN(account_id) AS sample, COUNT(*) AS n FROM accounts "
                "WHERE key_id IS NOT NULL GROUP BY key_id"
            ).fetchall()
            for row in rows:
                if row["key_id"] not in cipher.key_ids:
                    raise MissingKeyError(row["key_id"])
                sample = db.execute(
                    f"{SELECT_ACCOUNTS} WHERE account_id = ?",
                    (row["sample"],),
                ).fetchone()
                account_from_row(cipher, sample, tokens=True, forms=SQLITE_FORMS)
            return sum(int(row["n"]) for row in rows)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the database {database}: {exc}") from exc
