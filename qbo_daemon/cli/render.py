"""What the management commands print for a person: tables and durations, relative to now.

Pure functions of the API's JSON and ``now``; ``--json`` bypasses all of this.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from qbo_daemon.core.models import parse_iso

_ERROR_WIDTH = 60


def duration(seconds: float) -> str:
    """A short human duration: ``45s``, ``52m``, ``3h 5m``, ``12d 4h``."""
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def relative(value: str | None, now: datetime) -> str:
    """``in 42m``, ``3h ago``, or ``-`` for no time."""
    when = _time(value)
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"


# The refresh token of an account in these states is dead or gone: no expiry of it,
# or of the access token the daemon no longer serves, is worth showing.
_DEAD = frozenset({"needs_reconnect", "disconnected"})


def expires_in(account: Mapping[str, Any], now: datetime) -> str:
    """How long the access token lives: ``52m``, ``expired 3h ago``, ``-``."""
    if account.get("status") in _DEAD:
        return "-"
    when = _time(account.get("token_expires_at"))
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    return duration(delta) if delta > 0 else f"expired {duration(delta)} ago"


def reconnect_hint(account_ids: Sequence[str]) -> str:
    """What an operator runs for accounts whose user must connect again."""
    if len(account_ids) == 1:
        return f"qbo-daemon connect {account_ids[0]}, then send the user to the URL it prints"
    shown = ", ".join(account_ids[:3])
    more = f" and {len(account_ids) - 3} more" if len(account_ids) > 3 else ""
    return f"qbo-daemon connect ID for each ({shown}{more}), then send each user to the URL"


def accounts_table(accounts: Sequence[Mapping[str, Any]], now: datetime) -> str:
    """The ``accounts list`` table, with a summary line (and a hint when one needs a user)."""
    if not accounts:
        return "no accounts yet: connect one with `qbo-daemon connect ID` or import them\n"
    # Several daemons on PostgreSQL: which one refreshes each account first.
    nodes = any("node" in account for account in accounts)
    header: tuple[str, ...] = (
        "ACCOUNT",
        "REALM",
        "STATUS",
        "EXPIRES IN",
        "NEXT REFRESH",
        *(("NODE",) if nodes else ()),
        "FAILURES",
        "LAST ERROR",
    )
    rows = [header]
    for account in accounts:
        rows.append(
            (
                str(account["account_id"]),
                str(account.get("realm_id") or "-"),
                str(account["status"]),
                expires_in(account, now),
                relative(account.get("next_refresh_at"), now),
                *((str(account.get("node") or "-"),) if nodes else ()),
                str(account.get("failure_count", 0)),
                _short(account.get("last_error")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    counts = Counter(str(account["status"]) for account in accounts)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    noun = "account" if len(accounts) == 1 else "accounts"
    lines.append("")
    lines.append(f"{len(accounts)} {noun}: {summary}")
    stuck = [str(a["account_id"]) for a in accounts if a["status"] == "needs_reconnect"]
    if stuck:
        lines.append(f"needs_reconnect: the user must connect again: {reconnect_hint(stuck)}")
    return "\n".join(lines) + "\n"


def _realm(account: Mapping[str, Any]) -> str:
    realm = str(account.get("realm_id") or "-")
    if account.get("realm_verified") is False:
        return f"{realm}  (not yet confirmed by Intuit; checked again after each refresh)"
    return realm


def account_details(account: Mapping[str, Any], now: datetime) -> str:
    """``accounts show``: one field a line, times both relative and exact.

    A dead connection (``needs_reconnect``, ``disconnected``) shows no expiry
    and no next refresh: the row may still hold the times of tokens that no
    longer work, and printing them would make it look alive.
    """

    def when(key: str) -> str:
        value = account.get(key)
        return "-" if value is None else f"{relative(value, now)}  ({value})"

    def expiry(key: str) -> str:
        return f"expires {when(key)}" if account.get(key) else "-"

    account_id = str(account["account_id"])
    status = str(account["status"])
    fields = [
        ("account", account_id),
        ("status", status),
        ("realm id", _realm(account)),
    ]
    if status == "disconnected":
        fields += [
            ("access token", "none: disconnected, the tokens were forgotten"),
            ("refresh token", "none: disconnected, the tokens were forgotten"),
            ("next refresh", "none"),
        ]
    elif status == "needs_reconnect":
        fields += [
            ("access token", "not served: the connection needs the user to reconnect"),
            ("refresh token", "dead: Intuit refused it or it expired (see last error)"),
            ("next refresh", "none until the user reconnects"),
        ]
    else:
        expires = _time(account.get("token_expires_at"))
        access = "-" if expires is None else f"expires {when('token_expires_at')}"
        if expires is not None and expires <= now:
            access = f"expired {when('token_expires_at')}"
        fields += [
            ("access token", access),
            ("next refresh", when("next_refresh_at")),
            ("refresh token", expiry("refresh_token_expires_at")),
            ("hard expiry", when("refresh_token_hard_expires_at")),
        ]
    fields += [
        ("last refreshed", when("last_refreshed_at")),
        ("failures", str(account.get("failure_count", 0))),
        ("last error", str(account.get("last_error") or "-")),
        ("version", str(account.get("version", "-"))),
        ("created", when("created_at")),
        ("updated", when("updated_at")),
    ]
    if status in _DEAD:
        fields.append(("to reconnect", reconnect_hint([account_id])))
    width = max(len(name) for name, _ in fields)
    return "".join(f"{name.ljust(width)}  {value}\n" for name, value in fields)


def _short(text: object) -> str:
    if not text:
        return "-"
    line = " ".join(str(text).split())
    return line if len(line) <= _ERROR_WIDTH else line[: _ERROR_WIDTH - 1] + "…"


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_iso(value)
    except ValueError:
        return None
