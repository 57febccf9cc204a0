"""Management commands: they talk to the running daemon over its token API.

Every command reads ``--config`` (the daemon's own file) for ``[api] listen``
and the first of ``[api] keys``; ``--json`` prints the API's answer for
scripts. A daemon that does not answer is one line on stderr and exit 1.
Only ``keys rotate`` works without a daemon: it then opens the database
itself, under the lock a daemon would take.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qbo_daemon.cli.apiclient import (
    DEFAULT_TIMEOUT,
    ApiAnswerError,
    ApiClient,
    DaemonNotRunningError,
)
from qbo_daemon.cli.common import (
    CONFIG_HELP,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    read_config,
)
from qbo_daemon.cli.render import account_details, accounts_table, relative
from qbo_daemon.cli.rotate import Progress, Rotation, rotate_offline, rotate_online
from qbo_daemon.cli.verify import verdict_text, verify_accounts, verify_summary
from qbo_daemon.core.models import ACCOUNT_ID_RULE, valid_account_id
from qbo_daemon.engine.imports import (
    ImportFileError,
    check_rows,
    ignored_columns,
    item_json,
    read_file,
    read_rows,
)

# 100,000 rows take a while to check, encrypt and store (a thousand per transaction).
IMPORT_TIMEOUT = 600.0
# Skipped rows printed one per line; the rest are counted (--json lists every one).
MAX_PRINTED_SKIPS = 50

ROTATE_HELP = """\
Re-encrypt every stored secret under the first key of [storage] encryption_keys.

Procedure:
  1. qbo-daemon keys generate                  (a new key)
  2. put it FIRST in [storage] encryption_keys, keep the old keys after it
  3. systemctl reload qbo-daemon               (SIGHUP; or restart it)
  4. qbo-daemon keys rotate --config PATH      (this command; safe during refreshes)
  5. remove the old keys, then reload or restart the daemon again

With the daemon running, the daemon re-encrypts in batches and this command
shows progress; it refuses to start if the daemon has not loaded the new key
list yet. With no daemon running, it opens the database itself, under the
same lock a daemon takes.
"""

IMPORT_HELP = """\
Import existing connections from JSON lines or CSV (for example an export of a
classic qbo_accounts table: id, access_token, refresh_token, companyid,
account_id, created_at, updated_at, token_expires_at, reconnect_token_at).

Fields: account_id, realm_id (or companyid), refresh_token, and optionally
access_token, token_expires_at, refresh_token_expires_at. Other columns are
ignored and named once in the report; a literal NULL cell is empty. Times
without an offset are UTC. Every row is checked and reported by line number;
the good rows are stored a thousand per transaction, bad and duplicate rows are
skipped (at most 50 skipped rows are printed one by one; --json lists every one).
An account whose access token is not known to be valid is refreshed at once.
Accounts that exist already are skipped unless --replace is given.

--verify then refreshes every imported account once, through the daemon (single
flight, at [refresh] concurrency), and reports each: ok, needs_reconnect (with
Intuit's error: the user must connect again), or transient (Intuit could not be
reached; the daemon keeps retrying). --dry-run stores nothing and calls no one.
Exit status: 0 when every row was imported (and verified ok), 1 otherwise.
"""


def register(sub: Any, keys_sub: Any) -> None:
    """Add the management commands to the ``qbo-daemon`` parser."""

    def command(
        parent: Any, name: str, func: Any, help: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help,
            description=description or help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(func=func)
        parser.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        return parser

    def with_account(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("account_id", metavar="ACCOUNT_ID", type=_account_id_arg)

    accounts = sub.add_parser("accounts", help="list or show accounts", description="accounts")
    accounts.set_defaults(func=lambda _: _usage(accounts))
    accounts_sub = accounts.add_subparsers(metavar="ACTION")
    command(accounts_sub, "list", cmd_list, "every account: status, expiry, next refresh, errors")
    with_account(command(accounts_sub, "show", cmd_show, "one account in detail"))
    with_account(command(sub, "refresh", cmd_refresh, "refresh an account's tokens now"))
    connect = command(
        sub, "connect", cmd_connect, "print the Intuit authorization URL for an account"
    )
    with_account(connect)
    connect.add_argument(
        "--allow-realm-change",
        action="store_true",
        help="let this connection move the account to another QuickBooks company",
    )
    with_account(
        command(
            sub,
            "disconnect",
            cmd_disconnect,
            "revoke an account at Intuit (best effort) and forget its tokens",
        )
    )
    imp = command(sub, "import", cmd_import, "import existing connections", IMPORT_HELP)
    imp.add_argument("file", type=Path, metavar="FILE", help="JSON lines or CSV; - for stdin")
    imp.add_argument("--format", choices=("auto", "jsonl", "csv"), default="auto")
    imp.add_argument("--replace", action="store_true", help="overwrite accounts that exist")
    imp.add_argument("--dry-run", action="store_true", help="check every row, store nothing")
    imp.add_argument(
        "--verify", action="store_true", help="refresh each imported account once and report"
    )
    rotate = command(
        keys_sub, "rotate", cmd_keys_rotate, "re-encrypt under the first key", ROTATE_HELP
    )
    rotate.add_argument("--batch", type=int, default=500, help="rows per batch (1-10000)")


# -- commands -------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    answer = _client(args).call("GET", "/v1/accounts")
    if args.json:
        return _print_json(answer)
    print(accounts_table(answer["accounts"], _now()), end="")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    answer = _client(args).call("GET", f"/v1/accounts/{_account_id(args)}")
    if args.json:
        return _print_json(answer)
    print(account_details(answer, _now()), end="")
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    account_id = _account_id(args)
    client = _client(args)
    try:
        answer = client.call("POST", f"/v1/accounts/{account_id}/refresh")
    except ApiAnswerError as exc:
        if exc.code not in ("needs_reconnect", "disconnected"):
            raise
        return fail(_reconnect_message(client, account_id, exc.code))
    if args.json:
        return _print_json(answer)
    now = _now()
    print(
        f"refreshed {account_id}: access token expires {relative(answer['token_expires_at'], now)}"
        f" ({answer['token_expires_at']}), next refresh "
        f"{relative(answer.get('next_refresh_at') or answer['reconnect_token_at'], now)}"
    )
    return EXIT_OK


def cmd_connect(args: argparse.Namespace) -> int:
    account_id = _account_id(args)
    body = {"allow_realm_change": True} if args.allow_realm_change else None
    answer = _client(args).call("POST", f"/v1/accounts/{account_id}/authorize-url", body)
    if args.json:
        return _print_json(answer)
    print(answer["url"])
    if sys.stderr.isatty():
        print(
            f"Open this URL in a browser to connect {account_id} (valid ~10 minutes).",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_disconnect(args: argparse.Namespace) -> int:
    account_id = _account_id(args)
    answer = _client(args).call("DELETE", f"/v1/accounts/{account_id}")
    if args.json:
        return _print_json(answer)
    outcome = {
        "revoked": "revoked at Intuit",
        "failed": "Intuit did not confirm the revoke (see the daemon's log)",
        "not_needed": "it was already disconnected",
    }[answer["revoke"]]
    print(f"disconnected {account_id}: tokens forgotten; {outcome}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    try:
        if str(args.file) == "-":
            rows = read_rows(sys.stdin.read(), args.format)
        else:
            rows = read_file(args.file, args.format)
    except ImportFileError as exc:
        return fail(str(exc), EXIT_USAGE)
    config = read_config(args)
    client = ApiClient.from_config(config, timeout=IMPORT_TIMEOUT)
    ignored = ignored_columns(rows)
    good, bad = check_rows(rows, now=_now())
    skipped: list[dict[str, Any]] = [
        {"line": r.position, "account_id": r.account_id, "field": r.field, "reason": r.reason}
        for r in bad
    ]
    imported: list[dict[str, Any]] = []
    began = _now()  # every refresh of an imported account starts after this
    if good:
        lines = [checked.position for checked in good]
        answer = client.call(
            "POST",
            "/v1/import",
            {
                "accounts": [item_json(checked.item) for checked in good],
                "replace": args.replace,
                "dry_run": args.dry_run,
            },
        )
        for entry in answer["imported"]:
            imported.append({"line": lines[entry.pop("index")], **entry})
        for entry in answer["skipped"]:
            skipped.append({"line": lines[entry.pop("index")], **entry})
    skipped.sort(key=lambda entry: int(entry["line"]))
    report: dict[str, Any] = {
        "imported": imported,
        "skipped": skipped,
        "dry_run": args.dry_run,
        "ignored_columns": ignored,
    }
    unverified = False
    if args.verify and args.dry_run:
        print("--verify: nothing verified in a dry run (Intuit is never called)", file=sys.stderr)
    elif args.verify:
        verdicts = verify_accounts(
            replace(client, timeout=DEFAULT_TIMEOUT),
            [entry["account_id"] for entry in imported],
            since=began,
            parallel=config.refresh.concurrency,
        )
        for entry in imported:
            entry["verify"] = verdicts[entry["account_id"]].as_json()
        unverified = any(v.result != "ok" for v in verdicts.values())
    if args.json:
        _print_json(report)
    else:
        _print_import(report)
    return EXIT_FAILURE if skipped or unverified else EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    if not 1 <= args.batch <= 10_000:
        return fail("--batch must be from 1 to 10000", EXIT_USAGE)
    config = read_config(args)
    progress = _progress_printer()
    try:
        result = rotate_online(ApiClient.from_config(config), config, args.batch, progress)
    except DaemonNotRunningError:
        print(
            f"qbo-daemon is not running at {config.api.url}: re-encrypting in the database itself",
            file=sys.stderr,
        )
        result = asyncio.run(rotate_offline(config, args.batch, progress))
    return _print_rotation(result, as_json=args.json)


# -- helpers --------------------------------------------------------------------------


def _client(args: argparse.Namespace, timeout: float = DEFAULT_TIMEOUT) -> ApiClient:
    return ApiClient.from_config(read_config(args), timeout=timeout)


def _reconnect_message(client: ApiClient, account_id: str, code: str) -> str:
    """For an operator: why the account cannot refresh, and the command that mends it."""
    how = f"qbo-daemon connect {account_id}, then send the user to the URL it prints"
    if code == "disconnected":
        return (
            f"account {account_id!r} is disconnected (its tokens were forgotten); "
            f"to connect it again: {how}"
        )
    why = client.call("GET", f"/v1/accounts/{account_id}").get("last_error") or "refused by Intuit"
    return f"account {account_id!r} needs the user to reconnect ({why}): {how}"


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _account_id_arg(value: str) -> str:
    if not valid_account_id(value):
        raise argparse.ArgumentTypeError(f"must be {ACCOUNT_ID_RULE}")
    return value


def _account_id(args: argparse.Namespace) -> str:
    account_id: str = args.account_id
    return account_id


def _now() -> datetime:
    return datetime.now(UTC)


def _print_json(data: Any) -> int:
    print(json.dumps(data, indent=2))
    return EXIT_OK


def _print_import(report: dict[str, Any]) -> None:
    now = _now()
    if report["ignored_columns"]:
        names = ", ".join(report["ignored_columns"])
        print(f"ignored columns (not used by qbo-daemon): {names}")
    rows = [(entry["line"], entry, True) for entry in report["imported"]]
    rows += [(entry["line"], entry, False) for entry in report["skipped"]]
    unprinted = max(0, len(report["skipped"]) - MAX_PRINTED_SKIPS)
    printed = 0
    for line, entry, ok in sorted(rows, key=lambda row: int(row[0])):
        who = entry.get("account_id") or "?"
        if not ok:
            printed += 1
            if printed <= MAX_PRINTED_SKIPS:
                where = f"{entry['field']}: " if entry.get("field") else ""
                print(f"line {line}: skipped {who}: {where}{entry['reason']}")
            continue
        verb = "would import" if report["dry_run"] else "imported"
        note = " (replaced)" if entry.get("replaced") else ""
        if entry.get("refreshing_now"):
            note += ", refreshing now"
        elif entry.get("next_refresh_at"):
            note += f", next refresh {relative(entry['next_refresh_at'], now)}"
        if entry.get("verify"):
            note += f"; {verdict_text(who, entry['verify'])}"
        print(f"line {line}: {verb} {who}{note}")
    if unprinted:
        print(f"... and {unprinted:,} more skipped rows not shown (--json lists every row)")
    done, skipped = len(report["imported"]), len(report["skipped"])
    verb = "would import" if report["dry_run"] else "imported"
    tail = " (dry run: nothing was stored)" if report["dry_run"] else ""
    print(f"{verb} {done} of {done + skipped} rows, skipped {skipped}{tail}")
    verdicts = [entry["verify"] for entry in report["imported"] if entry.get("verify")]
    if verdicts:
        print(verify_summary(verdicts))


def _progress_printer() -> Progress:
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        text = f"re-encrypted {done} of {total} rows"
        if tty:
            print(f"\r{text}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    return show


def _print_rotation(result: Rotation, *, as_json: bool) -> int:
    if as_json:
        return _print_json(
            {
                "reencrypted": result.reencrypted,
                "remaining": result.remaining,
                "primary_key_id": result.key_id,
                "via": result.via,
            }
        )
    print(
        f"re-encrypted {result.reencrypted} rows under key id {result.key_id} "
        f"(by the {result.via}); {result.remaining} left under other keys. The old keys can "
        "now be removed from [storage] encryption_keys; then reload or restart the daemon."
    )
    return EXIT_OK
