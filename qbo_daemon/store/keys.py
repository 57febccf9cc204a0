"""Where the encryption keys come from: the configuration, or a development key file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from qbo_daemon.core.models import Secret
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key

log = structlog.get_logger("qbo_daemon.store.keys")


def load_cipher(encryption_keys: Sequence[Secret], database: Path) -> Cipher:
    """The configured keys, or a development key file beside the database."""
    texts = [key.reveal() for key in encryption_keys]
    if not texts:
        path = database.with_name(database.name + ".key")
        if path.exists():
            texts = [
                line.strip()
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
            log.info("storage.key_file_loaded", path=str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(generate_key() + "\n")
            log.warning(
                "storage.key_file_created",
                path=str(path),
                detail="no [storage] encryption_keys configured: a key was generated for "
                "development; configure one for production and keep it apart from the database",
            )
            return load_cipher(encryption_keys, database)
    return Cipher([EncryptionKey.from_text(text) for text in texts])
