"""One configuration value: its type, durations, URLs, listen addresses; the error shape.

:class:`_Section` reads a ``[section]`` table key by key with defaults and
checks. A bad value raises :class:`_Invalid`; whoever catches it adds the file
and the key through :func:`_error`, the one :class:`ConfigError` shape
``FILE: [SECTION] KEY: what is wrong``. The value of a key in ``_SECRET_KEYS``
is never echoed.

A listen address is ``HOST:PORT`` with an explicit host: ``127.0.0.1:3000``,
``[::1]:3000``, ``localhost:3000``, or ``0.0.0.0:3000`` / ``[::]:3000`` for all
interfaces. A bare ``:3000`` is refused so that exposing a listener beyond the
machine is always written out.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from qbo_daemon.core.errors import ConfigError

MASK = "********"  # a set secret as the rendered configuration shows it
# Keys whose values never appear in an error message.
_SECRET_KEYS = frozenset(
    {"client_secret", "keys", "encryption_keys", "secret", "webhook_url", "client_id", "url"}
)
_MAX_DURATION = timedelta(days=36500)


class _Invalid(Exception):
    """A bad value; whoever catches it adds the file and the key."""


def _error(where: str | None, section: str, key: str | None, message: str) -> ConfigError:
    """The one error shape, ``FILE: [SECTION] KEY: MESSAGE``; ``.key`` is ``section.key``."""
    error = ConfigError(f"{key}: {message}" if key else message, key=section, path=where)
    if key:
        error.key = f"{section}.{key}"
    return error


# --- durations -----------------------------------------------------------------------------

_DURATION = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)\s*d)?\s*(?:(?P<h>\d+(?:\.\d+)?)\s*h)?\s*"
    r"(?:(?P<m>\d+(?:\.\d+)?)\s*m)?\s*(?:(?P<s>\d+(?:\.\d+)?)\s*s)?"
)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_HINT = 'expected a duration like "90s", "10m", "1h" or a number of seconds'


def _duration(value: object) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(f"{_DURATION_HINT}, got {_describe(value)}")
    seconds: Decimal
    if isinstance(value, str):
        text = value.strip()
        match = _DURATION.fullmatch(text)
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = Decimal(text)
        elif text and match:
            seconds = sum(
                (Decimal(n) * _UNIT_SECONDS[u] for u, n in match.groupdict().items() if n),
                Decimal(0),
            )
        else:
            raise _Invalid(f"{_DURATION_HINT}, got {_describe(value)}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"{_DURATION_HINT}, got {value}")
    else:
        seconds = Decimal(value)
    if seconds < 0:
        raise _Invalid(f"must not be negative, got {_describe(value)}")
    if seconds > Decimal(_MAX_DURATION.days * 86400):
        raise _Invalid(f"must be at most {format_duration(_MAX_DURATION)}")
    return timedelta(microseconds=round(seconds * 1_000_000))


def parse_duration(value: object, key: str) -> timedelta:
    """``"90s"``, ``"10m"``, ``"1h"``, ``"2d"``, ``"1h30m"`` or seconds (int, float) as >= 0.

    Units go largest first and may carry decimals (``"1.5h"``); raises a
    :class:`ConfigError` naming ``key``.
    """
    try:
        return _duration(value)
    except _Invalid as exc:
        raise ConfigError(str(exc), key=key) from None


def format_duration(value: timedelta) -> str:
    """The shortest form :func:`parse_duration` reads back: ``"1h30m"``, ``"0.25s"``."""
    micros = value // timedelta(microseconds=1)
    if micros == 0:
        return "0s"
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        count, micros = divmod(micros, size * 1_000_000)
        if unit == "s":
            count_text = str(count)
            if micros:
                count_text = f"{count}.{micros:06d}".rstrip("0")
            if count or micros:
                parts.append(f"{count_text}s")
        elif count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


# --- describing a value --------------------------------------------------------------------


def _type_name(value: object) -> str:
    names: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
        ((datetime, date, time), "a date or time"),
    ]
    return next((name for kind, name in names if isinstance(value, kind)), type(value).__name__)


def _describe(value: object) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value}"
    return _type_name(value)


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return exc.strerror or type(exc).__name__


def _toml_string(value: str) -> str:
    escaped = []
    for char in value:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char in "\b\t\n\f\r":
            escaped.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


# --- reading one section --------------------------------------------------------------------


class _Section:
    """One ``[section]`` table, read key by key with defaults and checks."""

    def __init__(self, name: str, table: Mapping[str, object], where: str | None) -> None:
        self.name = name
        self.table = table
        self.where = where

    def fail(self, key: str, message: str) -> ConfigError:
        return _error(self.where, self.name, key, message)

    def _typed(self, key: str, kind: type, what: str) -> object:
        value = self.table.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            shown = _type_name(value) if key in _SECRET_KEYS else _describe(value)
            raise self.fail(key, f"expected {what}, got {shown}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._typed(key, str, "a string")
        return default if value is None else cast(str, value).strip()

    def optional(self, key: str) -> str | None:
        """A string where ``""`` (the example file's value) means unset."""
        return self.string(key, "") or None

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value.lower() not in choices:
            options = ", ".join(_toml_string(c) for c in choices)
            raise self.fail(key, f"expected one of {options}, got {_describe(value)}")
        return value.lower()

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._typed(key, int, "an integer")
        number = default if value is None else cast(int, value)
        if not low <= number <= high:
            raise self.fail(key, f"must be between {low} and {high}, got {number}")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def duration(self, key: str, default: str, *, positive: bool = False) -> timedelta:
        try:
            value = _duration(self.table.get(key, default))
        except _Invalid as exc:
            raise self.fail(key, str(exc)) from None
        if positive and not value:
            raise self.fail(key, "must be greater than zero")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self._typed(key, list, "an array of strings")
        if value is None:
            return None
        items = cast(list[object], value)
        for number, item in enumerate(items, 1):
            if not isinstance(item, str):
                raise self.fail(key, f"item {number}: expected a string, got {_type_name(item)}")
        return [cast(str, item).strip() for item in items]

    def url(self, key: str, default: str) -> str:
        value = self.optional(key) or default
        try:
            _check_url(value)
        except _Invalid as exc:
            shown = "" if key in _SECRET_KEYS else f", got {_describe(value)}"
            raise self.fail(key, f"{exc}{shown}") from None
        return value

    def optional_url(self, key: str) -> str | None:
        return None if self.optional(key) is None else self.url(key, "")

    def listen(self, key: str, default: str) -> tuple[str, int]:
        value = self.string(key, default)
        try:
            return _parse_listen(value)
        except _Invalid as exc:
            raise self.fail(key, f"{exc}, got {_describe(value)}") from None

    def file(self, key: str) -> Path | None:
        value = self.optional(key)
        return None if value is None else Path(value)


def _check_url(value: str) -> None:
    problem = "expected an http(s) URL with a host"
    if any(c.isspace() for c in value):
        raise _Invalid(problem)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(problem)
    if parts.username is not None or parts.password is not None:
        raise _Invalid("must not carry a user name or password")
    if parts.fragment:
        raise _Invalid("must not have a #fragment")


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _parse_listen(value: str) -> tuple[str, int]:
    hint = 'expected "HOST:PORT" such as "127.0.0.1:8765", "[::1]:8765" or "0.0.0.0:8765"'
    host, colon, port_text = value.rpartition(":")
    if not colon or not host:
        raise _Invalid(hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(hint) from None
    elif ":" in host:
        raise _Invalid(f"{hint} (an IPv6 address goes in brackets)")
    elif not _HOSTNAME.fullmatch(host):
        raise _Invalid(hint)
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _Invalid("the port must be a number from 1 to 65535")
    return host, int(port_text)
