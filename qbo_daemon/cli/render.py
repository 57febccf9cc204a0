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


def expires_in(account: Mapping[str, Any], now: datetime) -> str:
    """How long the access token lives: ``52m``, ``expired 3h ago``, ``-``."""
    if account.get("status") == "disconnected":
        return "-"
    when = _time(account.get("token_expires_at"))
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    return duration(delta) if delta > 0 else f"expired {duration(delta)} ago"


def accounts_table(accounts: Sequence[Mapping[str, Any]], now: datetime) -> str:
    """The ``accounts list`` table, with a summary line (and a hint when one needs a user)."""
    if not accounts:
        return "no accounts yet: connect one with `qbo-daemon connect ID` or import them\n"
    header = ("ACCOUNT", "STATUS", "EXPIRES IN", "NEXT REFRESH", "FAILURES", "LAST ERROR")
    rows = [header]
    for account in accounts:
        rows.append(
            (
                str(account["account_id"]),
                str(account["status"]),
                expires_in(account, now),
                relative(account.get("next_refresh_at"), now),
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
    if counts.get("needs_reconnect"):
        lines.append("needs_reconnect: the user must connect again (qbo-daemon connect ID)")
    return "\n".join(lines) + "\n"


def _realm(account: Mapping[str, Any]) -> str:
    realm = str(account.get("realm_id") or "-")
    if account.get("realm_verified") is False:
        return f"{realm}  (not yet confirmed by Intuit; checked again after each refresh)"
    return realm


def account_details(account: Mapping[str, Any], now: datetime) -> str:
    """``accounts show``: one field a line, times both relative and exact."""

    def when(key: str) -> str:
        value = account.get(key)
        return "-" if value is None else f"{relative(value, now)}  ({value})"

    fields = [
        ("account", str(account["account_id"])),
        ("status", str(account["status"])),
        ("realm id", _realm(account)),
        (
            "access token",
            f"expires {when('token_expires_at')}" if account.get("token_expires_at") else "-",
        ),
        ("expires in", expires_in(account, now)),
        ("next refresh", when("next_refresh_at")),
        ("refresh due at", when("reconnect_token_at")),
        (
            "refresh token",
            f"expires {when('refresh_token_expires_at')}"
            if account.get("refresh_token_expires_at")
            else "-",
        ),
        ("hard expiry", when("refresh_token_hard_expires_at")),
        ("last refreshed", when("last_refreshed_at")),
        ("failures", str(account.get("failure_count", 0))),
        ("last error", str(account.get("last_error") or "-")),
        ("version", str(account.get("version", "-"))),
        ("created", when("created_at")),
        ("updated", when("updated_at")),
    ]
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
