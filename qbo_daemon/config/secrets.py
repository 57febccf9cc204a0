"""Secrets: from the TOML file, a file, the environment or systemd credentials.

Where a secret comes from, first match wins:

1. the TOML file: the value itself (``client_secret = "..."``) or its file
   (``client_secret_file = "/path"``); setting both is an error, ``""`` is unset;
2. the environment: ``QBO_API_CLIENT_ID`` / ``QBO_API_CLIENT_SECRET`` (client
   credentials) and ``QBO_STORAGE_URL`` (``[storage] url``);
3. systemd credentials: ``$CREDENTIALS_DIRECTORY/client_id``, ``client_secret``,
   ``api_key``, ``encryption_key``, ``webhook_secret``, ``storage_url``.

A single-value secret file holds the value on one line. A key file (API keys,
encryption keys) holds one key per line; blank lines and ``#`` comments are
skipped.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from qbo_daemon.config.values import _error, _Invalid, _reason, _Section
from qbo_daemon.core.errors import ConfigError
from qbo_daemon.core.models import Secret

ENV_CLIENT_ID = "QBO_API_CLIENT_ID"
ENV_CLIENT_SECRET = "QBO_API_CLIENT_SECRET"  # noqa: S105 - a variable name
ENV_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
ENV_STORAGE_URL = "QBO_STORAGE_URL"


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


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Invalid(f"cannot read {file}: {_reason(exc)}") from None


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
