"""Configuration: one TOML file, validated once into frozen dataclasses.

:func:`load_config` is the only loader and the only reader of the environment,
which it takes as an argument. Every problem is one :class:`ConfigError` shaped
``FILE: [SECTION] KEY: what is wrong``; a secret's value is never echoed.

Where a secret comes from, first match wins:

1. the TOML file: the value itself (``client_secret = "..."``) or its file
   (``client_secret_file = "/path"``); setting both is an error, ``""`` is unset;
2. the environment: ``QBO_API_CLIENT_ID`` / ``QBO_API_CLIENT_SECRET`` (client
   credentials only);
3. systemd credentials: ``$CREDENTIALS_DIRECTORY/client_id``, ``client_secret``,
   ``api_key``, ``encryption_key``, ``webhook_secret``.

A single-value secret file holds the value on one line. A key file (API keys,
encryption keys) holds one key per line; blank lines and ``#`` comments are
skipped. Relative paths (``storage.path``, ``*_file``) are relative to the
working directory; ``~`` is not expanded.

A listen address is ``HOST:PORT`` with an explicit host: ``127.0.0.1:3000``,
``[::1]:3000``, ``localhost:3000``, or ``0.0.0.0:3000`` / ``[::]:3000`` for all
interfaces. A bare ``:3000`` is refused so that exposing a listener beyond the
machine is always written out.
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

from qbo_daemon.errors import ConfigError
from qbo_daemon.models import Secret

MASK = "********"
ENV_CLIENT_ID = "QBO_API_CLIENT_ID"
ENV_CLIENT_SECRET = "QBO_API_CLIENT_SECRET"  # noqa: S105 - a variable name
ENV_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"

# Intuit uses the same OAuth endpoints for sandbox and production (field notes).
_INTUIT_ENDPOINTS = {
    "authorization_endpoint": "https://appcenter.intuit.com/connect/oauth2",
    "token_endpoint": "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
    "revocation_endpoint": "https://developer.api.intuit.com/v2/oauth2/tokens/revoke",
}
DEFAULT_ENDPOINTS: Mapping[str, Mapping[str, str]] = {
    "production": _INTUIT_ENDPOINTS,
    "sandbox": _INTUIT_ENDPOINTS,
}

_SCHEMA: Mapping[str, tuple[str, ...]] = {
    "intuit": (
        "environment",
        "client_id",
        "client_id_file",
        "client_secret",
        "client_secret_file",
        "redirect_uri",
        "scopes",
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "timeout",
    ),
    "callback": ("listen", "success_redirect"),
    "api": ("listen", "keys", "key_file"),
    "storage": ("path", "encryption_keys", "key_file", "attempts_keep"),
    "refresh": (
        "lead",
        "concurrency",
        "backoff_initial",
        "backoff_max",
        "token_wait",
        "shutdown_grace",
        "hard_expiry_warning",
        "invalid_client_retry",
    ),
    "log": ("format", "level"),
    "notify": ("webhook_url", "secret", "secret_file", "timeout"),
}
# Keys whose values never appear in an error message.
_SECRET_KEYS = frozenset(
    {"client_secret", "keys", "encryption_keys", "secret", "webhook_url", "client_id"}
)
_MAX_DURATION = timedelta(days=36500)
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - names, not a bind


@dataclass(frozen=True, slots=True)
class IntuitConfig:
    """Who we are at Intuit and where to call it.

    The endpoints are resolved: the override if set, else the environment's
    default. ``client_id`` and ``client_secret`` are ``""`` when not configured
    (see :func:`require_credentials`).
    """

    environment: Literal["production", "sandbox"]
    client_id: str
    client_secret: Secret
    redirect_uri: str
    scopes: tuple[str, ...]
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str
    timeout: timedelta


@dataclass(frozen=True, slots=True)
class CallbackConfig:
    """The public server that completes the OAuth connect flow."""

    host: str
    port: int
    success_redirect: str | None
    path: str  # the path part of intuit.redirect_uri


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The private token API; a request must carry one of ``keys`` as a bearer token."""

    host: str
    port: int
    keys: tuple[Secret, ...]

    @property
    def url(self) -> str:
        """The base URL a local CLI uses to reach the API (a wildcard becomes loopback)."""
        host = _WILDCARDS.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """The SQLite database; ``encryption_keys`` are in padded url-safe base64."""

    path: Path
    encryption_keys: tuple[Secret, ...]  # the first encrypts, all decrypt
    attempts_keep: int  # rows kept in the refresh-attempts table


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    lead: timedelta  # refresh this long before the access token expires
    concurrency: int  # refreshes in flight at once
    backoff_initial: timedelta  # > 0
    backoff_max: timedelta  # >= backoff_initial
    token_wait: timedelta  # how long GET /token waits for a refresh
    shutdown_grace: timedelta  # drain time for in-flight refreshes on SIGTERM
    hard_expiry_warning: timedelta  # warn this long before Intuit's 5-year hard expiry
    invalid_client_retry: timedelta  # retry interval while client credentials are rejected


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["auto", "console", "json"]
    level: Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """An optional webhook; ``secret`` is always set when ``webhook_url`` is."""

    webhook_url: str | None
    secret: Secret | None
    timeout: timedelta


@dataclass(frozen=True, slots=True)
class Config:
    intuit: IntuitConfig
    callback: CallbackConfig
    api: ApiConfig
    storage: StorageConfig
    refresh: RefreshConfig
    log: LogConfig
    notify: NotifyConfig
    source: Path | None  # the file it came from; None for built-in defaults


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


# --- reading one section --------------------------------------------------------------------


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


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Invalid(f"cannot read {file}: {_reason(exc)}") from None


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


# --- secrets --------------------------------------------------------------------------------


class _Sources:
    """Where secrets outside the TOML file come from: the environment and systemd credentials."""

    def __init__(self, environ: Mapping[str, str], where: str | None) -> None:
        self.environ = environ
        directory = environ.get(ENV_CREDENTIALS_DIRECTORY, "").strip()
        self.credentials = Path(directory) if directory else None
        if self.credentials is not None and not _is_dir(self.credentials):
            raise ConfigError(
                f"${ENV_CREDENTIALS_DIRECTORY} is {directory!r}, which is not a directory",
                path=where,
            )

    def env(self, name: str) -> str | None:
        return self.environ.get(name, "").strip() or None

    def credential(self, name: str) -> Path | None:
        """The credential file ``name`` if systemd provided it."""
        if self.credentials is None:
            return None
        file = self.credentials / name
        try:
            return file if file.exists() else None
        except OSError:
            return file  # reading it reports why


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _single_value(file: Path) -> str:
    text = _read_text(file).strip()
    if not text:
        raise _Invalid(f"{file} is empty")
    if "\n" in text:
        raise _Invalid(f"{file} must hold the value on one line")
    return text


def _key_lines(file: Path) -> list[tuple[int, str]]:
    """The keys in ``file`` with their line numbers; blank lines and ``#`` comments skipped."""
    lines = [(n, line.strip()) for n, line in enumerate(_read_text(file).splitlines(), 1)]
    keys = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not keys:
        raise _Invalid(f"{file} holds no key")
    return keys


def _secret(
    section: _Section, key: str, sources: _Sources, env: str | None, credential: str
) -> Secret | None:
    """A single secret, by the precedence in the module docstring."""
    value = section.optional(key)
    file = section.file(f"{key}_file")
    if value is not None and file is not None:
        raise section.fail(f"{key}_file", f"set either {key} or {key}_file, not both")
    if file is not None:
        try:
            return Secret(_single_value(file))
        except _Invalid as exc:
            raise section.fail(f"{key}_file", str(exc)) from None
    if value is None and env is not None:
        value = sources.env(env)
    if value is not None:
        return Secret(value)
    found = sources.credential(credential)
    if found is None:
        return None
    try:
        return Secret(_single_value(found))
    except _Invalid as exc:
        raise _error(str(found), section.name, key, str(exc)) from None


def _keys(
    section: _Section,
    key: str,
    sources: _Sources,
    credential: str,
    check: Callable[[str], str],
) -> tuple[Secret, ...]:
    """A list of keys from ``key``, ``key_file`` or a credential file, each passed to ``check``."""
    listed = section.strings(key) or []
    file = section.file("key_file")
    if listed and file is not None:
        raise section.fail("key_file", f"set either {key} or key_file, not both")
    if listed:
        found: list[Secret] = []
        for number, item in enumerate(listed, 1):
            try:
                found.append(Secret(check(item)))
            except _Invalid as exc:
                raise section.fail(key, f"key {number} {exc}") from None
        return tuple(found)
    source_key, source = "key_file", file
    if source is None:
        source_key, source = key, sources.credential(credential)
    if source is None:
        return ()
    where, line_prefix = (section.where, f"{source} ") if file else (str(source), "")
    try:
        lines = _key_lines(source)
    except _Invalid as exc:
        raise _error(where, section.name, source_key, str(exc)) from None
    keys: list[Secret] = []
    for number, line in lines:
        try:
            keys.append(Secret(check(line)))
        except _Invalid as exc:
            message = f"{line_prefix}line {number}: key {exc}"
            raise _error(where, section.name, source_key, message) from None
    return tuple(keys)


def _encryption_key(value: str) -> str:
    """The key in its padded form if it is url-safe base64 of exactly 32 bytes."""
    if re.fullmatch(r"[A-Za-z0-9_-]{43}=?", value):
        padded = value[:43] + "="
        raw = base64.urlsafe_b64decode(padded)
        if len(raw) == 32 and base64.urlsafe_b64encode(raw).decode() == padded:
            return padded
    raise _Invalid(
        "is not url-safe base64 of exactly 32 bytes (make one with `qbo-daemon keys generate`)"
    )


def _api_key(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise _Invalid("must be a non-empty string without whitespace")
    return value


# --- the loader -----------------------------------------------------------------------------


def _owner(key: str) -> str | None:
    return next((section for section, keys in _SCHEMA.items() if key in keys), None)


def _suggest(name: str, known: Iterable[str], shape: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {shape.format(close[0])}?" if close else ""


def _check_names(data: Mapping[str, object], where: str | None) -> None:
    """Refuse unknown sections and keys, suggesting the closest known name."""
    for section, table in data.items():
        if section not in _SCHEMA:
            if isinstance(table, dict):
                hint = _suggest(section, _SCHEMA, "[{}]")
                error = ConfigError(f"unknown section [{section}]{hint}", path=where)
            else:
                owner = _owner(section)
                hint = f"; it belongs in [{owner}]" if owner else ""
                error = ConfigError(f'unknown top-level key "{section}"{hint}', path=where)
            error.key = section
            raise error
        if not isinstance(table, dict):
            raise _error(where, section, None, f"expected a table, got {_type_name(table)}")
        for key in table:
            if key not in _SCHEMA[section]:
                hint = _suggest(key, _SCHEMA[section], '"{}"')
                owner = _owner(key)
                if not hint and owner:
                    hint = f"; it belongs in [{owner}]"
                raise _error(where, section, key, f"unknown key{hint}")


def load_config(path: Path | None, environ: Mapping[str, str]) -> Config:
    """Read and validate ``path`` (``None``: built-in defaults) plus ``environ``."""
    where: str | None = None
    data: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            message = f"cannot read the configuration file: {_reason(exc)}"
            raise ConfigError(message, path=where) from None
        except UnicodeDecodeError:
            raise ConfigError("the configuration file is not UTF-8 text", path=where) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"TOML syntax error: {exc}", path=where) from None
    _check_names(data, where)
    sections = {
        name: _Section(name, cast(Mapping[str, object], data.get(name, {})), where)
        for name in _SCHEMA
    }
    sources = _Sources(environ, where)
    intuit = _intuit(sections["intuit"], sources)
    callback = _callback(sections["callback"], intuit.redirect_uri)
    return Config(
        intuit=intuit,
        callback=callback,
        api=_api(sections["api"], callback, sources),
        storage=_storage(sections["storage"], sources),
        refresh=_refresh(sections["refresh"]),
        log=LogConfig(
            format=cast(
                Literal["auto", "console", "json"],
                sections["log"].choice("format", "auto", ("auto", "console", "json")),
            ),
            level=cast(
                Literal["debug", "info", "warning", "error"],
                sections["log"].choice("level", "info", ("debug", "info", "warning", "error")),
            ),
        ),
        notify=_notify(sections["notify"], sources),
        source=path,
    )


def default_config(environ: Mapping[str, str] | None = None) -> Config:
    """Every default, plus whatever secrets ``environ`` supplies."""
    return load_config(None, environ or {})


def _intuit(section: _Section, sources: _Sources) -> IntuitConfig:
    environment = section.choice("environment", "production", ("production", "sandbox"))
    redirect_uri = section.url("redirect_uri", "http://localhost:3000/accounts/oauth2_callback")
    if urlsplit(redirect_uri).query:
        raise section.fail("redirect_uri", "must not have a ?query")
    scopes = section.strings("scopes")
    if scopes is None:
        scopes = ["com.intuit.quickbooks.accounting"]
    if not scopes or any(not s or any(c.isspace() for c in s) for s in scopes):
        raise section.fail("scopes", "expected a non-empty array of scopes without whitespace")
    client_id = _secret(section, "client_id", sources, ENV_CLIENT_ID, "client_id")
    client_secret = _secret(section, "client_secret", sources, ENV_CLIENT_SECRET, "client_secret")
    defaults = DEFAULT_ENDPOINTS[environment]
    endpoints = {name: section.url(name, default) for name, default in defaults.items()}
    return IntuitConfig(
        environment=cast(Literal["production", "sandbox"], environment),
        client_id=client_id.reveal() if client_id else "",
        client_secret=client_secret or Secret(""),
        redirect_uri=redirect_uri,
        scopes=tuple(scopes),
        authorization_endpoint=endpoints["authorization_endpoint"],
        token_endpoint=endpoints["token_endpoint"],
        revocation_endpoint=endpoints["revocation_endpoint"],
        timeout=section.duration("timeout", "30s", positive=True),
    )


def _callback(section: _Section, redirect_uri: str) -> CallbackConfig:
    host, port = section.listen("listen", "127.0.0.1:3000")
    return CallbackConfig(
        host=host,
        port=port,
        success_redirect=section.optional_url("success_redirect"),
        path=urlsplit(redirect_uri).path or "/",
    )


def _api(section: _Section, callback: CallbackConfig, sources: _Sources) -> ApiConfig:
    host, port = section.listen("listen", "127.0.0.1:8765")
    hosts = {host, callback.host}
    if port == callback.port and (len(hosts) == 1 or hosts & set(_WILDCARDS)):
        raise section.fail("listen", "overlaps [callback] listen; give them different ports")
    return ApiConfig(
        host=host, port=port, keys=_keys(section, "keys", sources, "api_key", _api_key)
    )


def _storage(section: _Section, sources: _Sources) -> StorageConfig:
    path = section.string("path", "qbo-daemon.sqlite3")
    if not path:
        raise section.fail("path", "must not be empty")
    return StorageConfig(
        path=Path(path),
        encryption_keys=_keys(
            section, "encryption_keys", sources, "encryption_key", _encryption_key
        ),
        attempts_keep=section.integer("attempts_keep", 100_000, 100, 2**62),
    )


def _refresh(section: _Section) -> RefreshConfig:
    backoff_initial = section.duration("backoff_initial", "5s", positive=True)
    backoff_max = section.duration("backoff_max", "5m")
    if backoff_max < backoff_initial:
        raise section.fail(
            "backoff_max", f"must be at least backoff_initial ({format_duration(backoff_initial)})"
        )
    return RefreshConfig(
        lead=section.duration("lead", "10m"),
        concurrency=section.integer("concurrency", 8, 1, 1024),
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        token_wait=section.duration("token_wait", "30s", positive=True),
        shutdown_grace=section.duration("shutdown_grace", "20s"),
        hard_expiry_warning=section.duration("hard_expiry_warning", "30d"),
        invalid_client_retry=section.duration("invalid_client_retry", "5m", positive=True),
    )


def _notify(section: _Section, sources: _Sources) -> NotifyConfig:
    webhook_url = section.optional_url("webhook_url")
    secret = _secret(section, "secret", sources, None, "webhook_secret")
    if webhook_url is not None and secret is None:
        raise section.fail(
            "secret",
            "required when webhook_url is set "
            "(secret, secret_file or $CREDENTIALS_DIRECTORY/webhook_secret)",
        )
    return NotifyConfig(
        webhook_url=webhook_url,
        secret=secret,
        timeout=section.duration("timeout", "10s", positive=True),
    )


def require_credentials(config: Config) -> None:
    """Refuse to run without client credentials and API keys.

    Encryption keys may be missing: the daemon then makes a key file beside
    the database (development) and warns.

    ``load_config`` lets them be missing so that ``demo`` and ``check-config``
    work; the daemon's ``run`` calls this before it starts anything.
    """
    how = "in the file, a {0}_file, ${1} or $CREDENTIALS_DIRECTORY/{0}"
    missing: list[tuple[str, str, str]] = []
    if not config.intuit.client_id:
        missing.append(("intuit", "client_id", how.format("client_id", ENV_CLIENT_ID)))
    if not config.intuit.client_secret:
        missing.append(("intuit", "client_secret", how.format("client_secret", ENV_CLIENT_SECRET)))
    if not config.api.keys:
        missing.append(("api", "keys", "keys, key_file or $CREDENTIALS_DIRECTORY/api_key"))
    if missing:
        listed = "; ".join(f"[{section}] {key} ({hint})" for section, key, hint in missing)
        source = None if config.source is None else str(config.source)
        error = ConfigError(f"missing {listed}", path=source)
        error.key = f"{missing[0][0]}.{missing[0][1]}"
        raise error


# --- rendering ------------------------------------------------------------------------------


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


_Renderable = str | int | timedelta | Path | Secret | tuple[str, ...] | tuple[Secret, ...] | None


def _toml_value(value: _Renderable) -> str:
    if isinstance(value, Secret):
        return _toml_string(MASK if value else "")
    if isinstance(value, tuple):
        items = (_toml_value(item) for item in value)
        return "[" + ", ".join(items) + "]"
    if isinstance(value, timedelta):
        return _toml_string(format_duration(value))
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if value is None:
        return '""'
    return _toml_string(str(value))


def _masked_url(url: str | None) -> str | None:
    """A webhook URL's path and query often are its secret (Slack, Discord): hide them."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.path.strip("/") or parts.query:
        return f"{parts.scheme}://{parts.netloc}/{MASK}"
    return url


def render_config(config: Config) -> str:
    """The effective configuration as TOML, every secret shown as ``"********"``.

    ``client_id`` is masked too (it travels through the same channels as the
    secret), and so are a webhook URL's path and query, which often are its
    credential. An unset value shows as ``""``.
    """
    i, c, a, s, r, n = (
        config.intuit,
        config.callback,
        config.api,
        config.storage,
        config.refresh,
        config.notify,
    )
    tables: dict[str, dict[str, _Renderable]] = {
        "intuit": {
            "environment": i.environment,
            "client_id": Secret(i.client_id),
            "client_secret": i.client_secret,
            "redirect_uri": i.redirect_uri,
            "scopes": i.scopes,
            "authorization_endpoint": i.authorization_endpoint,
            "token_endpoint": i.token_endpoint,
            "revocation_endpoint": i.revocation_endpoint,
            "timeout": i.timeout,
        },
        "callback": {
            "listen": _listen_text(c.host, c.port),
            "success_redirect": c.success_redirect,
        },
        "api": {"listen": _listen_text(a.host, a.port), "keys": a.keys},
        "storage": {
            "path": s.path,
            "encryption_keys": s.encryption_keys,
            "attempts_keep": s.attempts_keep,
        },
        "refresh": {name: getattr(r, name) for name in _SCHEMA["refresh"]},
        "log": {"format": config.log.format, "level": config.log.level},
        "notify": {
            "webhook_url": _masked_url(n.webhook_url),
            "secret": n.secret,
            "timeout": n.timeout,
        },
    }
    source = config.source if config.source is not None else "built-in defaults"
    lines = [f"# effective qbo-daemon configuration from {source}; secrets masked"]
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _listen_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
