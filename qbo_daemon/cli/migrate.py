"""``qbo-daemon migrate-storage``: copy an installation between SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from qbo_daemon.cli.common import EXIT_OK, read_config
from qbo_daemon.config.load import Config
from qbo_daemon.core.dburl import is_postgres_url
from qbo_daemon.core.errors import ConfigError
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.keys import load_cipher
from qbo_daemon.store.transfer import migrate_storage

HELP = """\
Copy every account, OAuth state and refresh attempt from one storage to another:
an SQLite file (a path) or a PostgreSQL database (a postgresql:// URL), either way.

Stop every daemon first: an SQLite side is taken under the daemon's lock, and a
PostgreSQL side is refused while a qbo-daemon is connected to it. The target
must be empty (a new file, or a database without qbo-daemon rows). The rows are
copied as stored (the secrets stay the same ciphertext) in one transaction,
then verified: the same rows on both sides, and every stored secret decrypts
with the configured keys ([storage] encryption_keys of --config, or the key
file beside an SQLite side).

An omitted --from or --to is the storage --config names ([storage] url, else
path), so a URL that holds a password need not appear on the command line:
  qbo-daemon migrate-storage --config /etc/qbo-daemon/config.toml \\
      --from /var/lib/qbo-daemon/qbo-daemon.sqlite3

Then point [storage] at the target and start the daemons.
"""


def register(sub: Any) -> None:
    """Add ``migrate-storage`` to the ``qbo-daemon`` parser."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "migrate-storage",
        help="copy an installation between SQLite and PostgreSQL (daemons stopped)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=cmd_migrate_storage)
    parser.add_argument("--config", type=Path, metavar="PATH", help="the TOML configuration")
    parser.add_argument("--from", dest="source", metavar="PATH_OR_URL", help="copy from")
    parser.add_argument("--to", dest="target", metavar="PATH_OR_URL", help="copy into")


def cmd_migrate_storage(args: argparse.Namespace) -> int:
    config = read_config(args)
    configured = config.storage.url.reveal() if config.storage.url else str(config.storage.path)
    source: str = args.source or configured
    target: str = args.target or configured
    if args.source is None and args.target is None:
        raise ConfigError("give --from or --to (or both): the other defaults to [storage]")
    cipher = _cipher(config, source, target)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    summary = asyncio.run(migrate_storage(source, target, cipher, progress=progress))
    counts = summary.counts
    print(
        f"copied {counts['accounts']:,} accounts, {counts['oauth_states']:,} OAuth states and "
        f"{counts['refresh_attempts']:,} refresh attempts from {summary.source} to "
        f"{summary.target}"
    )
    keys = ", ".join(summary.key_ids) or "none"
    print(f"verified: the same rows on both sides; every secret decrypts (key ids: {keys})")
    return EXIT_OK


def _cipher(config: Config, *sides: str) -> Cipher:
    """The configured keys, else the development key file beside an SQLite side."""
    if config.storage.encryption_keys:
        return Cipher([EncryptionKey.from_text(k.reveal()) for k in config.storage.encryption_keys])
    for side in sides:
        path = Path(side)
        if not is_postgres_url(side) and path.with_name(path.name + ".key").exists():
            return load_cipher((), path)
    error = ConfigError(
        "no encryption keys configured (encryption_keys, key_file or "
        "$CREDENTIALS_DIRECTORY/encryption_key): migrate-storage decrypts every stored "
        "secret to verify the copy",
        key="storage",
        path=None if config.source is None else str(config.source),
    )
    error.key = "storage.encryption_keys"
    raise error
