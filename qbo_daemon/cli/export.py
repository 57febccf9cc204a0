"""``qbo-daemon export``: every live connection, for a backup or the road back to a cron job.

Tokens leave the daemon only with ``--include-secrets``, only into a new file
created mode 0600, and only with no daemon running: the command then reads the
database itself under the lock a daemon takes, so no refresh can rotate a
token while the export is taken, and none after it as long as the daemon stays
stopped. Without secrets the export also works beside a running daemon, through
its API (times and realm ids, the token columns left empty).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from qbo_daemon.cli.apiclient import ApiClient, DaemonNotRunningError
from qbo_daemon.cli.common import CONFIG_HELP, EXIT_OK, EXIT_USAGE, fail, read_config
from qbo_daemon.config.load import Config
from qbo_daemon.core.errors import ConfigError, DatabaseLockedError, QboDaemonError
from qbo_daemon.engine.export import (
    CSV_COLUMNS,
    ExportFormat,
    ExportRow,
    LeftOut,
    row_from_account,
    row_from_listing,
    split_live,
    write_rows,
)
from qbo_daemon.store.keys import load_cipher
from qbo_daemon.store.repository import DatabaseLock, Storage

# Accounts decrypted per round of reads (the store serves a round in a few queries).
_READ_CHUNK = 500

EXPORT_HELP = f"""\
Write every live connection (status active or expired) as CSV in the shape of
the classic qbo_accounts table ({", ".join(CSV_COLUMNS)}),
ready for psql's \\copy ... from ... csv header, or as JSON lines.
`qbo-daemon import` reads both back.

Without --include-secrets the token columns are empty; this works while the
daemon runs (through its API). With --include-secrets the tokens are written,
only into a new file (--output, created mode 0600, never overwritten), and only
while no daemon runs: stop it first (systemctl stop qbo-daemon), so that no
refresh rotates a token during or after the export. Start it again only if you
are not moving back to the exported table: every refresh it makes from then on
can replace a refresh token the file holds.

Accounts that need a reconnect or were disconnected hold no working refresh
token: they are left out and named on stderr.
"""


def register(sub: Any) -> None:
    """Add ``export`` to the ``qbo-daemon`` parser."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "export",
        help="write every live connection as CSV (classic qbo_accounts) or JSON lines",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=cmd_export)
    parser.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    parser.add_argument(
        "--include-secrets",
        action="store_true",
        help="write the access and refresh tokens (needs --output; the daemon must be stopped)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="a new file to create (mode 0600); default: standard output, without secrets",
    )


def cmd_export(args: argparse.Namespace) -> int:
    output: Path | None = args.output
    if args.include_secrets and output is None:
        return fail(
            "--include-secrets writes tokens only into a new file: add --output FILE", EXIT_USAGE
        )
    if output is not None and (output.exists() or output.is_symlink()):
        return fail(
            f"{output} exists: export writes only a new file; choose another name", EXIT_USAGE
        )
    config = read_config(args)
    fmt: ExportFormat = args.format
    if args.include_secrets:
        return asyncio.run(_export_from_database(config, fmt, output, include_secrets=True))
    try:
        listing = ApiClient.from_config(config).call("GET", "/v1/accounts")
    except DaemonNotRunningError:
        return asyncio.run(_export_from_database(config, fmt, output, include_secrets=False))
    accounts: list[dict[str, Any]] = listing["accounts"]
    live, left_out = split_live((str(a["account_id"]), str(a["status"])) for a in accounts)
    rows = [row_from_listing(a) for a in accounts if a["account_id"] in live]
    _write(rows, fmt, output)
    _report(len(rows), left_out, fmt, output, secrets=False, via=f"the daemon at {config.api.url}")
    return EXIT_OK


async def _export_from_database(
    config: Config, fmt: ExportFormat, output: Path | None, *, include_secrets: bool
) -> int:
    """Read the database under the daemon's lock, and write while holding it."""
    path = config.storage.path
    if not path.exists():
        raise QboDaemonError(
            f"no database at {path} (a relative [storage] path is relative to the "
            "working directory; the systemd unit's is /var/lib/qbo-daemon)"
        )
    key_file = path.with_name(path.name + ".key")
    if not config.storage.encryption_keys and not key_file.exists():
        raise ConfigError("no encryption keys configured", key="storage")
    lock = DatabaseLock(path)
    try:
        lock.acquire()
    except DatabaseLockedError:
        raise QboDaemonError(
            f"a qbo-daemon is running on {path}: stop it first (systemctl stop qbo-daemon). "
            "While it runs it rotates refresh tokens, so tokens exported beside it can be "
            "dead by the time they are used. Without --include-secrets the export goes "
            "through the running daemon."
        ) from None
    try:
        storage = await Storage.open(
            path,
            load_cipher(config.storage.encryption_keys, path),
            attempts_keep=config.storage.attempts_keep,
        )
        try:
            await storage.verify_keys()
            listed = await storage.list_accounts()
            live, left_out = split_live((a.account_id, a.status.value) for a in listed)
            ids = [a.account_id for a in listed if a.account_id in live]
            rows: list[ExportRow] = []
            for start in range(0, len(ids), _READ_CHUNK):
                chunk = ids[start : start + _READ_CHUNK]
                accounts = await asyncio.gather(*(storage.load(i) for i in chunk))
                rows += [row_from_account(a, include_secrets=include_secrets) for a in accounts]
        finally:
            await storage.close()
        _write(rows, fmt, output)
    finally:
        lock.release()
    _report(len(rows), left_out, fmt, output, secrets=include_secrets, via=f"the database {path}")
    return EXIT_OK


def _write(rows: list[ExportRow], fmt: ExportFormat, output: Path | None) -> None:
    if output is None:
        write_rows(rows, sys.stdout, fmt)
        return
    out = _create(output)
    try:
        with out:
            write_rows(rows, out, fmt)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            output.unlink()
        raise


def _create(path: Path) -> TextIO:
    """A new file only the owner can read; an existing file or link is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise QboDaemonError(
            f"{path} exists: export writes only a new file; choose another name"
        ) from None
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8", newline="")


def _report(
    count: int,
    left_out: list[LeftOut],
    fmt: ExportFormat,
    output: Path | None,
    *,
    secrets: bool,
    via: str,
) -> None:
    noun = "account" if count == 1 else "accounts"
    tokens = "with tokens" if secrets else "without tokens"
    where = f" to {output}" if output is not None else ""
    print(f"exported {count} {noun} ({fmt}, {tokens}){where}, read from {via}", file=sys.stderr)
    if left_out:
        by_status: dict[str, list[str]] = {}
        for entry in left_out:
            by_status.setdefault(entry.status, []).append(entry.account_id)
        for status, ids in sorted(by_status.items()):
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            print(
                f"left out {len(ids)} {status} (no working refresh token): {shown}",
                file=sys.stderr,
            )
