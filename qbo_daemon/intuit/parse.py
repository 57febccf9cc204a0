"""Every value Intuit sends us, read strictly and totally.

Strictly: a number is ASCII digits (``str.isdigit`` and ``int`` also take
``"²"`` or Arabic-Indic digits), a word is printable ASCII, text is trimmed to
one printable line. Totally: no function here raises, whatever it is given,
and every duration is clamped to a documented range, so the time arithmetic
that follows cannot overflow.

An out-of-range value is clamped, not refused: refusing a 200 answer for its
lifetime would throw away the rotated refresh token it carries, and Intuit
may already have retired the old one. What cannot be read at all is
``None``; the caller decides the conservative reading (see
:mod:`qbo_daemon.intuit.client`).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Final

from qbo_daemon.core.models import utc

__all__ = [
    "ACCESS_TOKEN_MAX_LIFETIME",
    "HARD_EXPIRY_MAX_LIFETIME",
    "LATEST",
    "MAX_BODY_BYTES",
    "REFRESH_TOKEN_MAX_LIFETIME",
    "RETRY_AFTER_MAX",
    "after",
    "error_code",
    "intuit_tid",
    "json_object",
    "lifetime",
    "retry_after",
    "text",
    "token",
]

# Intuit documents expires_in as 3600: a longer one would make us serve a dead token.
ACCESS_TOKEN_MAX_LIFETIME: Final = timedelta(seconds=3600)
# x_refresh_token_expires_in is 8726400 (101 days) when fresh, counting down.
REFRESH_TOKEN_MAX_LIFETIME: Final = timedelta(seconds=8_726_400)
# x_refresh_token_hard_expires_in: five years, two leap days included.
HARD_EXPIRY_MAX_LIFETIME: Final = timedelta(days=5 * 365 + 2)
# Retry-After is a floor under our own backoff; the scheduler caps it at
# [refresh] backoff_max. This only keeps the number itself sane.
RETRY_AFTER_MAX: Final = timedelta(days=1)
# The largest answer read from Intuit; a token answer is a few kilobytes.
MAX_BODY_BYTES: Final = 1024 * 1024
# The latest instant time arithmetic here yields: far past any real expiry, and
# early enough that .timestamp() and back stays in datetime's range.
LATEST: Final = datetime(9000, 1, 1, tzinfo=UTC)

# A span no lifetime reaches, and the last instant from which it cannot pass LATEST.
_SHORT: Final = 100 * 365 * 86400.0
_SHORT_BEFORE_LATEST: Final = LATEST - timedelta(seconds=_SHORT)
_ZERO: Final = timedelta(0)

_DIGITS: Final = re.compile(r"[0-9]+")
_DECIMAL: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# An HTTP date (IMF-fixdate, RFC 850, asctime) uses only these, in at most ~40 characters.
_HTTP_DATE: Final = re.compile(r"[A-Za-z0-9 ,:+-]{1,64}")
# More digits than this are out of every range anyway; int() of them is not needed.
_MAX_INT_DIGITS: Final = 18
_ASCII_BLANKS: Final = " \t"
_WORD: Final = re.compile(r"[\x21-\x7e]+")
_TID: Final = re.compile(r"[\x21-\x7e]{1,128}")
_ERROR_CODE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def lifetime(value: object, maximum: timedelta) -> timedelta | None:
    """A lifetime field (``expires_in`` and the like): seconds in ``(0, maximum]``.

    Takes a JSON number or a string of ASCII digits. Longer than ``maximum``
    (``Infinity`` and numbers too long for ``int`` included) is ``maximum``;
    zero (or less than a microsecond), negative, ``NaN``, a boolean, any other
    string or type is ``None``.
    """
    seconds: float
    if type(value) is int:  # what Intuit sends; bool is not int here
        if value <= 0:
            return None
        return timedelta(seconds=value) if value < maximum.total_seconds() else maximum
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if value <= 0:
            return None
        seconds = float(min(value, int(maximum.total_seconds())))
    elif isinstance(value, float):
        if math.isnan(value) or value <= 0:
            return None
        seconds = value
    elif isinstance(value, str):
        digits = value.strip(_ASCII_BLANKS)
        if not _DIGITS.fullmatch(digits):
            return None
        if len(digits.lstrip("0")) > _MAX_INT_DIGITS:
            return maximum
        seconds = float(int(digits))
        if seconds == 0:
            return None
    else:
        return None
    life = timedelta(seconds=min(seconds, maximum.total_seconds()))
    # Under half a microsecond (1e-7, 6e-266) rounds to zero: not a lifetime either.
    return life if life > _ZERO else None


def retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now``, in ``[0, RETRY_AFTER_MAX]``.

    Delta-seconds are ASCII digits (a decimal fraction is taken too: the
    simulator sends one so tests stay fast); an HTTP date in the past is 0.
    Anything else (``1e12``, ``-3``, ``nan``, a date out of range) is ``None``,
    as if the header were absent: the backoff alone decides.
    """
    if value is None:
        return None
    stripped = value.strip(_ASCII_BLANKS)
    ceiling = RETRY_AFTER_MAX.total_seconds()
    if _DECIMAL.fullmatch(stripped):
        # float() of a digit string never raises; a very long one is inf.
        return min(float(stripped), ceiling)
    if not _HTTP_DATE.fullmatch(stripped):
        return None
    try:
        when = utc(parsedate_to_datetime(stripped))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max((when - now).total_seconds(), 0.0), ceiling)


def after(instant: datetime, seconds: float) -> datetime:
    """``instant`` plus ``seconds`` (clamped to ``[0, ...]``), never past :data:`LATEST`.

    ``datetime + timedelta`` raises ``OverflowError`` past year 9999 and
    ``timedelta(seconds=...)`` past ~2.7 million years or on ``NaN``; this
    does neither.
    """
    if 0 < seconds <= _SHORT and instant.tzinfo is not None and instant <= _SHORT_BEFORE_LATEST:
        return instant + timedelta(seconds=seconds)  # every real lifetime: nothing to clamp
    latest = LATEST if instant.tzinfo is not None else LATEST.replace(tzinfo=None)
    if instant >= latest:
        return instant
    room = (latest - instant).total_seconds()
    if not seconds > 0:  # NaN included
        return instant
    if seconds >= room:
        return latest
    return instant + timedelta(seconds=seconds)


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` (not JSON, not an object, too deep).

    Integers longer than ``int`` will parse (4,300 digits) read as infinite,
    so a huge lifetime is clamped instead of making the whole answer unreadable.
    """
    try:
        data = json.loads(body, parse_int=_json_int)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def token(value: object) -> str | None:
    """An access or refresh token: one non-empty word of printable ASCII, else ``None``.

    Intuit's tokens are base64url-like words. Anything else (a space, a control
    character, a lone surrogate that could not even be encrypted) is garbage.
    """
    if isinstance(value, str) and _WORD.fullmatch(value):
        return value
    return None


def intuit_tid(value: str | None) -> str | None:
    """The ``intuit_tid`` header: printable ASCII, at most 128 characters, else ``None``.

    It is logged and stored with each attempt; a strange one is dropped, not kept.
    """
    if value is not None and _TID.fullmatch(value):
        return value
    return None


def error_code(value: object) -> str | None:
    """OAuth's ``error`` field (``invalid_grant``...): a short ASCII word, else ``None``."""
    if isinstance(value, str) and _ERROR_CODE.fullmatch(value):
        return value
    return None


def text(value: str, limit: int = 200) -> str:
    """Intuit's (or a proxy's) own words for a log line or an error: one printable line.

    Whitespace runs become one space; anything unprintable (control and format
    characters, lone surrogates) becomes ``?``; at most ``limit`` characters.
    """
    line = " ".join(value[: limit * 4].split())[:limit]
    return "".join(c if c.isprintable() else "?" for c in line)


def _json_int(digits: str) -> int | float:
    if len(digits) <= _MAX_INT_DIGITS:  # every number Intuit sends
        return int(digits)
    if len(digits.lstrip("-").lstrip("0")) > _MAX_INT_DIGITS:
        return -math.inf if digits.startswith("-") else math.inf
    return int(digits)
