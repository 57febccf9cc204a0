"""How the status page words things: times, statuses, errors. Pure functions.

The page's script (``static/app.js``) keeps relative times current between
refreshes with the same rules as :func:`relative`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qbo_daemon.core.models import AccountStatus, iso

STATUS_LABELS = {
    AccountStatus.ACTIVE: "Active",
    AccountStatus.EXPIRED: "Expired, retrying",
    AccountStatus.NEEDS_RECONNECT: "Needs reconnect",
    AccountStatus.DISCONNECTED: "Disconnected",
}
STATUS_HINTS = {
    AccountStatus.ACTIVE: "access token valid, next refresh scheduled",
    AccountStatus.EXPIRED: "access token dead, refresh token alive: retrying with backoff",
    AccountStatus.NEEDS_RECONNECT: "Intuit refused the refresh token: the user must connect again",
    AccountStatus.DISCONNECTED: "tokens revoked and forgotten",
}


@dataclass(frozen=True, slots=True)
class Explanation:
    """An account's trouble in words: what happened, and what happens or helps next."""

    headline: str
    advice: str
    detail: str | None  # the recorded error message, verbatim


def relative(when: datetime | None, now: datetime) -> str:
    """``"in 4 min"``, ``"2 h ago"``, ``"now"``; ``"—"`` for no time."""
    if when is None:
        return "—"
    seconds = (when - now).total_seconds()
    if abs(seconds) < 1.5:
        return "now"
    text = _span(abs(seconds))
    return f"in {text}" if seconds > 0 else f"{text} ago"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h"
    if seconds < 365 * 86400:
        return f"{round(seconds / 86400)} d"
    return f"{seconds / (365.25 * 86400):.1f} y"


def clock(when: datetime | None) -> str:
    """Clock time in UTC, to the second: ``2026-11-29 14:05:12 UTC``."""
    if when is None:
        return "—"
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def short_clock(when: datetime | None, now: datetime) -> str:
    """``14:05:12`` today (UTC), ``Nov 30 14:05`` on another day."""
    if when is None:
        return "—"
    if when.date() == now.date():
        return when.strftime("%H:%M:%S")
    if when.year == now.year:
        return when.strftime("%b %d %H:%M")
    return when.strftime("%Y-%m-%d")


def duration(milliseconds: float) -> str:
    if milliseconds < 1000:
        return f"{milliseconds:.0f} ms"
    return f"{milliseconds / 1000:.2f} s"


def explain(
    status: AccountStatus, last_error: str | None, failure_count: int
) -> Explanation | None:
    """The account's trouble in words, or None when it has none."""
    error = last_error or ""
    if status is AccountStatus.NEEDS_RECONNECT:
        if "hard expiry" in error:
            headline = "The refresh token reached Intuit's 5-year limit."
        elif "refresh token expired" in error:
            headline = "The refresh token expired: it was not used for about 100 days."
        elif "invalid_grant" in error:
            headline = (
                "Intuit no longer accepts this connection's refresh token (invalid_grant): "
                "the user revoked access, or the token was replaced elsewhere."
            )
        else:
            headline = "Intuit refused to refresh this connection."
        return Explanation(
            headline,
            "Only the user can fix this: send them a new connect link. The host app gets "
            "409 needs_reconnect for this account until then.",
            last_error,
        )
    if status is AccountStatus.DISCONNECTED:
        return Explanation(
            "This account was disconnected: its tokens were revoked at Intuit and forgotten.",
            "Send the user a new connect link to connect it again.",
            None,
        )
    if failure_count == 0 and not error:
        return None
    cause = _transient_cause(error)
    if status is AccountStatus.EXPIRED:
        return Explanation(
            f"The access token has expired and the last {_attempts(failure_count)} failed: {cause}",
            "The refresh token is still good, so the daemon keeps retrying with backoff; the "
            "host app gets 503 for a token until a retry succeeds. Refresh now to try at once.",
            last_error,
        )
    return Explanation(
        f"The last {_attempts(failure_count)} failed: {cause}",
        "The access token is still valid; the daemon retries with backoff before it expires.",
        last_error,
    )


def _attempts(count: int) -> str:
    return "refresh attempt" if count <= 1 else f"{count} refresh attempts"


def _transient_cause(error: str) -> str:
    if "did not answer within" in error:
        return "Intuit did not answer in time."
    if "cannot reach Intuit" in error:
        return "Intuit could not be reached (network or DNS)."
    if "HTML" in error:
        return "Intuit answered with an error page (an outage at Intuit)."
    if "HTTP 429" in error:
        return "Intuit asked us to slow down (HTTP 429)."
    if "HTTP 5" in error:
        return "Intuit had a server error (HTTP 5xx)."
    if "client credentials" in error:
        return "Intuit refused the daemon's client id or secret (a configuration fault)."
    return "Intuit's answer could not be used."


def template_filters() -> dict[str, Callable[..., Any]]:
    return {
        "clock": clock,
        "short_clock": short_clock,
        "relative": relative,
        "duration": duration,
        "iso": iso,
        "label": lambda status: STATUS_LABELS[status],
        "thousands": lambda n: f"{n:,}",
    }
