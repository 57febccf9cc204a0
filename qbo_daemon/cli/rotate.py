"""Re-encrypting every stored secret under the first configured key.

With the daemon running, the rows are re-encrypted by the daemon itself in
batches (``POST /v1/keys/rotate``), each row a compare-and-swap so a refresh
writing at the same moment is never overwritten. Without a daemon, the
command opens the database itself, under the same lock a daemon takes, so
no daemon can start meanwhile.

The procedure, also in ``qbo-daemon keys rotate --help`` and docs/host-apps.md:
put the new key first in ``[storage] encryption_keys`` (keep the old ones
after it), reload the daemon (SIGHUP) or restart it, run ``keys rotate``,
then drop the old keys and reload or restart again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qbo_daemon.cli.apiclient import ApiClient
from qbo_daemon.config.load import Config
from qbo_daemon.core.errors import DatabaseLockedError, QboDaemonError
from qbo_daemon.store.crypto import EncryptionKey
from qbo_daemon.store.keys import load_cipher
from qbo_daemon.store.repository import DatabaseLock, Storage

Progress = Callable[[int, int], None]  # (done so far, total)
# Batches in a row that re-encrypt nothing (every row changed meanwhile) before giving up.
_MAX_STALLS = 5


@dataclass(frozen=True, slots=True)
class Rotation:
    reencrypted: int
    remaining: int
    key_id: str
    via: str  # "daemon" or "database"


def configured_key_id(config: Config) -> str | None:
    """The key id the configuration's first key has (None: no key listed)."""
    if not config.storage.encryption_keys:
        return None
    return EncryptionKey.from_text(config.storage.encryption_keys[0].reveal()).key_id


def rotate_online(client: ApiClient, config: Config, batch: int, progress: Progress) -> Rotation:
    """Ask the running daemon for batches until nothing is left under another key."""
    body: dict[str, object] = {"batch": batch}
    expected = configured_key_id(config)
    if expected is not None:
        body["expected_key_id"] = expected
    done = stalls = 0
    while True:
        answer = client.call("POST", "/v1/keys/rotate", body)
        done += int(answer["reencrypted"])
        remaining = int(answer["remaining"])
        progress(done, done + remaining)
        if remaining == 0:
            return Rotation(done, 0, str(answer["primary_key_id"]), "daemon")
        stalls = stalls + 1 if answer["reencrypted"] == 0 else 0
        if stalls >= _MAX_STALLS:
            raise QboDaemonError(
                f"{remaining} rows could not be re-encrypted (they kept changing); run again"
            )


async def rotate_offline(config: Config, batch: int, progress: Progress) -> Rotation:
    """Re-encrypt with no daemon running, holding the database lock throughout."""
    path = config.storage.path
    if not path.exists():
        raise QboDaemonError(f"no database at {path}: nothing to re-encrypt")
    cipher = load_cipher(config.storage.encryption_keys, path)  # none configured: says how
    lock = DatabaseLock(path)
    try:
        lock.acquire()
    except DatabaseLockedError:
        raise QboDaemonError(
            f"a qbo-daemon holds {path} but does not answer at {config.api.url}; "
            "check [api] listen, or stop it and run this command again"
        ) from None
    try:
        storage = await Storage.open(path, cipher, attempts_keep=config.storage.attempts_keep)
        try:
            await storage.verify_keys()
            done = stalls = 0
            while True:
                now, remaining = await storage.reencrypt(batch=batch)
                done += now
                progress(done, done + remaining)
                if remaining == 0:
                    return Rotation(done, 0, storage.primary_key_id, "database")
                stalls = stalls + 1 if now == 0 else 0
                if stalls >= _MAX_STALLS:
                    raise QboDaemonError(f"{remaining} rows could not be re-encrypted")
        finally:
            await storage.close()
    finally:
        lock.release()
