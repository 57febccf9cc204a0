"""What is checked before the daemon starts: ``run`` and ``check-config`` share it.

:func:`preflight` looks at a loaded configuration and the machine it is to run
on, and returns every problem at once. An error stops ``run`` (exit status 2,
so systemd does not restart it in a loop) and makes ``check-config`` fail; a
warning is logged by ``run`` and printed by ``check-config``.

Errors: client credentials or API keys missing, no encryption key (the daemon
never makes one beside the database), keys that do not decrypt the existing
database, a database path in a directory that does not exist, a listen address
that cannot be bound. Warnings: secrets written in a configuration file that
every user can read, a token API listening beyond loopback, an Intuit endpoint
in plain ``http://`` off loopback, an API key or webhook secret shorter than
32 characters.

Nothing here writes: the database is opened read-only, and each listen address
is bound and closed at once.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from qbo_daemon.config.load import Config, require_credentials
from qbo_daemon.core.errors import ConfigError, CryptoError, StorageError
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.keys import DEFAULT_KEY_FILE, missing_key_message, verify_database_keys

# Secrets long enough not to be guessed online (a token_urlsafe(24) is 32 characters).
MIN_SECRET_LENGTH = 32
# Where a secret may be written inline in the file: (section, key).
_INLINE_SECRETS = (
    ("intuit", "client_secret"),
    ("api", "keys"),
    ("storage", "encryption_keys"),
    ("notify", "secret"),
)
# Intuit URLs the daemon calls (api_base once the realm check exists).
_INTUIT_URLS = ("authorization_endpoint", "token_endpoint", "revocation_endpoint", "api_base")
_GENERATE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: ``setting`` names where it is (``[storage] path``)."""

    severity: Literal["error", "warning"]
    setting: str | None
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        return f"{self.setting}: {self.message}" if self.setting else self.message


def preflight(config: Config) -> list[Finding]:
    """Every check ``run`` makes before it starts, errors first."""
    findings = [
        *_credentials(config),
        *_storage(config),
        *_listeners(config),
        *_file_secrets(config),
        *_endpoints(config),
        *_short_secrets(config),
    ]
    return sorted(findings, key=lambda f: not f.is_error)


def _error(setting: str | None, message: str) -> Finding:
    return Finding("error", setting, message)


def _warning(setting: str | None, message: str) -> Finding:
    return Finding("warning", setting, message)


def _credentials(config: Config) -> Iterator[Finding]:
    try:
        require_credentials(config)
    except ConfigError as exc:
        yield _error(None, str(exc))


def _storage(config: Config) -> Iterator[Finding]:
    path = config.storage.path
    directory = path.parent
    if not directory.is_dir():
        yield _error(
            "[storage] path",
            f"the directory {directory} does not exist: create it (with the owner the "
            "daemon runs as) or correct the path; a new database is only made in an "
            "existing directory",
        )
        return
    if not config.storage.encryption_keys:
        yield _error("[storage] key_file", missing_key_message(path, _key_file_for(config)))
        return
    try:
        keys = [EncryptionKey.from_text(k.reveal()) for k in config.storage.encryption_keys]
        verify_database_keys(path, Cipher(keys))
    except (CryptoError, StorageError) as exc:
        yield _error("[storage] encryption_keys", f"{path}: {exc}")


def _key_file_for(config: Config) -> Path:
    """Where to suggest keeping a new key: beside the configuration, unless the data is there."""
    data = config.storage.path.parent.resolve()
    if config.source is not None:
        beside_config = config.source.parent.resolve()
        if beside_config != data:
            return beside_config / "encryption_key"
    return DEFAULT_KEY_FILE


def _listeners(config: Config) -> Iterator[Finding]:
    listeners = (
        ("[callback] listen", config.callback.host, config.callback.port),
        ("[api] listen", config.api.host, config.api.port),
    )
    for setting, host, port in listeners:
        try:
            addresses = _addresses(host, port)
        except OSError as exc:
            yield _error(setting, f"cannot resolve {host!r}: {exc.strerror or exc}")
            continue
        for family, address in addresses:
            problem = _bind_problem(family, address)
            if problem == errno.EADDRINUSE:
                yield _warning(
                    setting,
                    f"{host}:{port} is in use now (a qbo-daemon already running?); "
                    "`run` cannot listen there until it is free",
                )
            elif problem is not None:
                yield _error(setting, f"cannot listen on {host}:{port}: {_reason(problem)}")
            else:
                continue
            break
        if setting == "[api] listen" and not all(_loopback(a[1][0]) for a in addresses):
            yield _warning(
                setting,
                f"{host}:{port} is reachable beyond this machine: whoever holds an API key "
                "there gets access tokens; keep it on 127.0.0.1 unless a firewall guards it",
            )


def _addresses(host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    found: list[tuple[int, tuple[str, int]]] = []
    for family, _, _, _, sockaddr in infos:
        entry = (int(family), (str(sockaddr[0]), int(sockaddr[1])))
        if entry not in found:
            found.append(entry)
    return found


def _bind_problem(family: int, address: tuple[str, int]) -> int | None:
    """The errno binding ``address`` fails with, as the daemon's listener would bind it."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.errno or errno.EINVAL
    return None


def _reason(code: int) -> str:
    if code == errno.EADDRNOTAVAIL:
        return "not an address of this machine"
    if code == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return errno.errorcode.get(code, str(code))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _file_secrets(config: Config) -> Iterator[Finding]:
    """Secrets written in a configuration file that every user may read."""
    source = config.source
    if source is None:
        return
    try:
        mode = source.stat().st_mode
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_config has read it a moment ago; nothing to add
    if not mode & stat.S_IROTH:
        return
    inline = [
        f"[{section}] {key}"
        for section, key in _INLINE_SECRETS
        if isinstance(data.get(section), dict) and data[section].get(key)
    ]
    if inline:
        yield _warning(
            None,
            f"{source} holds {', '.join(inline)} and every user can read it "
            f"(mode {stat.S_IMODE(mode):04o}): chmod 600 {source}, or move the secrets to "
            "*_file / key_file or systemd credentials",
        )


def _endpoints(config: Config) -> Iterator[Finding]:
    for name in _INTUIT_URLS:
        url = getattr(config.intuit, name, None)
        if not isinstance(url, str):
            continue
        parts = urlsplit(url)
        if parts.scheme == "http" and not _loopback(parts.hostname or ""):
            yield _warning(
                f"[intuit] {name}",
                f"plain http:// to {parts.hostname}: the client secret and the tokens would "
                "cross the network unencrypted; use https://",
            )


def _short_secrets(config: Config) -> Iterator[Finding]:
    for number, key in enumerate(config.api.keys, 1):
        if len(key.reveal()) < MIN_SECRET_LENGTH:
            yield _warning(
                "[api] keys",
                f"key {number} is shorter than {MIN_SECRET_LENGTH} characters; "
                f"make a longer one with {_GENERATE}",
            )
    secret = config.notify.secret
    if secret and len(secret.reveal()) < MIN_SECRET_LENGTH:
        yield _warning(
            "[notify] secret",
            f"shorter than {MIN_SECRET_LENGTH} characters; make a longer one with {_GENERATE}",
        )
