"""Configuration: one TOML file, validated once into frozen dataclasses.

:func:`load_config` is the only loader and the only reader of the environment,
which it takes as an argument. Every problem is one :class:`ConfigError` shaped
``FILE: [SECTION] KEY: what is wrong``; a secret's value is never echoed.

Values are read by :mod:`qbo_daemon.config.values`, secrets found by
:mod:`qbo_daemon.config.secrets` (its docstring gives the precedence), and the
effective configuration is shown by :mod:`qbo_daemon.config.render`. Relative
paths (``storage.path``, ``*_file``) are relative to the working directory;
``~`` is not expanded.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

from qbo_daemon.config.secrets import (
    ENV_CLIENT_ID,
    ENV_CLIENT_SECRET,
    ENV_CREDENTIALS_DIRECTORY,
    ENV_STORAGE_URL,
    _api_key,
    _encryption_key,
    _keys,
    _secret,
    _Sources,
)
from qbo_daemon.config.values import (
    MASK,
    _error,
    _reason,
    _Section,
    _type_name,
    format_duration,
    parse_duration,
)
from qbo_daemon.core.dburl import postgres_url_problem
from qbo_daemon.core.errors import ConfigError
from qbo_daemon.core.models import ACCOUNT_ID_PATTERN, Secret

__all__ = [
    "DEFAULT_API_BASES",
    "DEFAULT_ENDPOINTS",
    "ENV_CLIENT_ID",
    "ENV_CLIENT_SECRET",
    "ENV_CREDENTIALS_DIRECTORY",
    "ENV_STORAGE_URL",
    "MASK",
    "ApiConfig",
    "CallbackConfig",
    "ClusterConfig",
    "Config",
    "IntuitConfig",
    "LogConfig",
    "NotifyConfig",
    "RefreshConfig",
    "StorageConfig",
    "default_config",
    "format_duration",
    "load_config",
    "parse_duration",
    "require_credentials",
]

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
# The Accounting API differs: the realm check calls {api_base}/v3/company/{realm}/companyinfo/...
DEFAULT_API_BASES: Mapping[str, str] = {
    "production": "https://quickbooks.api.intuit.com",
    "sandbox": "https://sandbox-quickbooks.api.intuit.com",
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
        "api_base",
        "timeout",
        "pkce",
    ),
    "callback": (
        "listen",
        "success_redirect",
        "allow_shared_realm",
        "max_connections",
        "read_timeout",
    ),
    "api": ("listen", "keys", "key_file", "max_connections", "read_timeout"),
    "storage": ("path", "url", "url_file", "encryption_keys", "key_file", "attempts_keep"),
    "refresh": (
        "lead",
        "concurrency",
        "backoff_initial",
        "backoff_max",
        "backoff_max_expired",
        "token_wait",
        "shutdown_grace",
        "hard_expiry_warning",
        "invalid_client_retry",
    ),
    "log": ("format", "level", "access"),
    "notify": ("webhook_url", "secret", "secret_file", "timeout"),
    "cluster": ("node_id",),
}
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - names, not a bind
# The callback's default port sits beside the API's (8765), away from the ports web
# frameworks take in development: 3000 (Rails, Next.js), 4000, 5000, 5173, 8000, 8080.
# A host app run with `rails s` beside the daemon must not find its port taken.
DEFAULT_CALLBACK_LISTEN = "127.0.0.1:8766"
DEFAULT_REDIRECT_URI = "http://localhost:8766/accounts/oauth2_callback"


@dataclass(frozen=True, slots=True)
class IntuitConfig:
    """Who we are at Intuit and where to call it.

    The endpoints are resolved: the override if set, else the environment's
    default. ``client_id`` and ``client_secret`` are ``""`` when not configured
    (see :func:`require_credentials`). ``api_base`` is the Accounting API's
    base URL, without a trailing ``/``; ``pkce`` adds an S256 code challenge to
    every authorization (off by default: Intuit does not document it).
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
    api_base: str = DEFAULT_API_BASES["production"]
    pkce: bool = False


# Each listener's connection cap and read deadline (see http/listener.py).
CALLBACK_MAX_CONNECTIONS, CALLBACK_READ_TIMEOUT = 128, timedelta(seconds=10)
API_MAX_CONNECTIONS, API_READ_TIMEOUT = 1024, timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class CallbackConfig:
    """The public server that completes the OAuth connect flow."""

    host: str
    port: int
    success_redirect: str | None
    path: str  # the path part of intuit.redirect_uri
    # Whether one QuickBooks company may be connected under several account ids.
    allow_shared_realm: bool = False
    max_connections: int = CALLBACK_MAX_CONNECTIONS  # open at once
    read_timeout: timedelta = CALLBACK_READ_TIMEOUT  # for a request head, and for its body


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The private token API; a request must carry one of ``keys`` as a bearer token."""

    host: str
    port: int
    keys: tuple[Secret, ...]
    max_connections: int = API_MAX_CONNECTIONS  # open at once
    read_timeout: timedelta = API_READ_TIMEOUT  # for a request head, and for its body

    @property
    def url(self) -> str:
        """The base URL a local CLI uses to reach the API (a wildcard becomes loopback)."""
        host = _WILDCARDS.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Where accounts are kept; ``encryption_keys`` are in padded url-safe base64.

    ``url`` None: the SQLite file at ``path`` (the default). A ``postgresql://``
    URL: that database, shared by several daemons. The URL may hold a
    password: it is a :class:`Secret`, shown only through ``redact_url``.
    """

    path: Path
    url: Secret | None
    encryption_keys: tuple[Secret, ...]  # the first encrypts, all decrypt
    attempts_keep: int  # rows kept in the refresh-attempts table


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    lead: timedelta  # refresh this long before the access token expires
    concurrency: int  # calls to Intuit at once (timer refreshes in flight: twice that)
    backoff_initial: timedelta  # > 0
    backoff_max: timedelta  # >= backoff_initial
    backoff_max_expired: timedelta  # the retry cap once the access token is dead (if shorter)
    token_wait: timedelta  # how long GET /token waits for a refresh
    shutdown_grace: timedelta  # drain time for in-flight refreshes on SIGTERM
    hard_expiry_warning: timedelta  # warn this long before Intuit's 5-year hard expiry
    invalid_client_retry: timedelta  # retry interval while client credentials are rejected


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["auto", "console", "json"]
    level: Literal["debug", "info", "warning", "error"]
    # The level of per-request access lines; health checks and scrapes are never above debug.
    access: Literal["info", "debug", "off"] = "info"


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """An optional webhook; ``secret`` is always set when ``webhook_url`` is."""

    webhook_url: str | None
    secret: Secret | None
    timeout: timedelta


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """This daemon among several on one PostgreSQL database."""

    node_id: str  # "" = host name and PID, resolved at start-up (:meth:`resolved_node_id`)

    def resolved_node_id(self, *, host: str, pid: int) -> str:
        """The configured id, or ``HOST:PID`` (each process its own) when none is set."""
        return self.node_id or f"{host}:{pid}"


@dataclass(frozen=True, slots=True)
class Config:
    intuit: IntuitConfig
    callback: CallbackConfig
    api: ApiConfig
    storage: StorageConfig
    refresh: RefreshConfig
    log: LogConfig
    notify: NotifyConfig
    cluster: ClusterConfig
    source: Path | None  # the file it came from; None for built-in defaults


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
            access=cast(
                Literal["info", "debug", "off"],
                sections["log"].choice("access", "info", ("info", "debug", "off")),
            ),
        ),
        notify=_notify(sections["notify"], sources),
        cluster=_cluster(sections["cluster"]),
        source=path,
    )


def default_config(environ: Mapping[str, str] | None = None) -> Config:
    """Every default, plus whatever secrets ``environ`` supplies."""
    return load_config(None, environ or {})


def _intuit(section: _Section, sources: _Sources) -> IntuitConfig:
    environment = section.choice("environment", "production", ("production", "sandbox"))
    redirect_uri = section.url("redirect_uri", DEFAULT_REDIRECT_URI)
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
    api_base = section.url("api_base", DEFAULT_API_BASES[environment])
    if urlsplit(api_base).query:
        raise section.fail("api_base", "must not have a ?query")
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
        api_base=api_base.rstrip("/"),
        pkce=section.boolean("pkce", False),
    )


def _callback(section: _Section, redirect_uri: str) -> CallbackConfig:
    host, port = section.listen("listen", DEFAULT_CALLBACK_LISTEN)
    return CallbackConfig(
        host=host,
        port=port,
        success_redirect=section.optional_url("success_redirect"),
        path=urlsplit(redirect_uri).path or "/",
        allow_shared_realm=section.boolean("allow_shared_realm", False),
        max_connections=section.integer("max_connections", CALLBACK_MAX_CONNECTIONS, 1, 100_000),
        read_timeout=section.duration(
            "read_timeout", format_duration(CALLBACK_READ_TIMEOUT), positive=True
        ),
    )


def _api(section: _Section, callback: CallbackConfig, sources: _Sources) -> ApiConfig:
    host, port = section.listen("listen", "127.0.0.1:8765")
    hosts = {host, callback.host}
    if port == callback.port and (len(hosts) == 1 or hosts & set(_WILDCARDS)):
        raise section.fail("listen", "overlaps [callback] listen; give them different ports")
    return ApiConfig(
        host=host,
        port=port,
        keys=_keys(section, "keys", sources, "api_key", _api_key),
        max_connections=section.integer("max_connections", API_MAX_CONNECTIONS, 1, 100_000),
        read_timeout=section.duration(
            "read_timeout", format_duration(API_READ_TIMEOUT), positive=True
        ),
    )


def _storage(section: _Section, sources: _Sources) -> StorageConfig:
    path = section.string("path", "qbo-daemon.sqlite3")
    if not path:
        raise section.fail("path", "must not be empty")
    return StorageConfig(
        path=Path(path),
        url=_storage_url(section, sources),
        encryption_keys=_keys(
            section, "encryption_keys", sources, "encryption_key", _encryption_key
        ),
        attempts_keep=section.integer("attempts_keep", 100_000, 100, 2**62),
    )


def _storage_url(section: _Section, sources: _Sources) -> Secret | None:
    """``[storage] url`` from wherever it came (a secret: it may hold a password), checked.

    An error names where the bad URL came from and never repeats it.
    """
    url = _secret(section, "url", sources, ENV_STORAGE_URL, "storage_url")
    problem = None if url is None else postgres_url_problem(url.reveal())
    if problem is None:
        return url
    file = section.file("url_file")
    if section.optional("url") is not None:
        raise section.fail("url", problem)
    if file is not None:
        raise section.fail("url_file", f"{file}: {problem}")
    if sources.env(ENV_STORAGE_URL) is not None:
        raise section.fail("url", f"${ENV_STORAGE_URL}: {problem}")
    raise _error(str(sources.credential("storage_url")), section.name, "url", problem)


def _cluster(section: _Section) -> ClusterConfig:
    node_id = section.string("node_id", "")
    if node_id and not ACCOUNT_ID_PATTERN.fullmatch(node_id):
        raise section.fail(
            "node_id",
            "expected 1 to 128 characters: ASCII letters, digits and . _ : @ -, "
            "starting with a letter or digit",
        )
    return ClusterConfig(node_id=node_id)


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
        backoff_max_expired=section.duration("backoff_max_expired", "30s", positive=True),
        token_wait=section.duration("token_wait", "30s", positive=True),
        shutdown_grace=section.duration("shutdown_grace", "35s"),
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

    ``load_config`` lets them be missing so that ``demo`` works; ``run`` and
    ``check-config`` call this through ``cli.preflight``, which also refuses a
    missing encryption key (the daemon never makes one beside the database).
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
