"""Database URLs: which storage a URL selects, checked, and shown without its password.

``[storage] url`` and ``migrate-storage --from/--to`` take a PostgreSQL URL
(``postgresql://user:password@host:5432/db``, libpq's form, as asyncpg reads
it). Such a URL may carry a password, in its user part or as a ``password=``
query parameter, so it is a secret: an error about it never repeats it, and
wherever it must be named (``check-config``, a log line, a summary) it is
shown by :func:`redact_url`. No I/O here.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

POSTGRES_SCHEMES = ("postgresql", "postgres")
# How a redacted password shows (the configuration's mask).
_MASK = "********"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HINT = 'expected a URL like "postgresql://user@host:5432/dbname"'


def is_postgres_url(text: str) -> bool:
    """Whether ``text`` names a PostgreSQL database (rather than an SQLite file path)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in POSTGRES_SCHEMES


def postgres_url_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a PostgreSQL URL, or None. Never repeats the URL."""
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return f'{_HINT} ("" keeps the SQLite file at path)'
    if scheme.lower() not in POSTGRES_SCHEMES:
        return f"the scheme must be postgresql:// or postgres://, got {scheme.lower()}://"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return f"{_HINT}, without spaces or control characters"
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    hosts = netloc.rpartition("@")[2]
    for host in hosts.split(","):  # libpq allows several hosts: h1:5432,h2:5432
        if host.startswith("["):
            _, bracket, port = host.partition("]")
            if not bracket:
                return f"{_HINT}: an IPv6 address needs its closing bracket"
            port = port.removeprefix(":")
        else:
            port = host.partition(":")[2]
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"{_HINT}: the port must be a number from 1 to 65535"
    return None


def redact_url(text: str) -> str:
    """``text`` with its password (user part and ``*password=`` parameters) masked.

    Anything that is not URL-shaped is masked whole: it may be a password
    pasted in the wrong place.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return _MASK
    end = re.search(r"[/?#]", rest)
    netloc, tail = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{_MASK}@{hosts}"
    tail = tail.partition("#")[0]
    path, question, query = tail.partition("?")
    if question:
        params = []
        for param in query.split("&"):
            name, equals, _ = param.partition("=")
            params.append(f"{name}={_MASK}" if equals and "password" in name.lower() else param)
        path = f"{path}?{'&'.join(params)}"
    return f"{scheme}://{netloc}{path}"


def scrub_url_secrets(text: str, url: str) -> str:
    """``text`` (say a driver's error message) with ``url``'s password masked wherever it shows."""
    text = text.replace(url, redact_url(url))
    for secret in _passwords(url):
        text = text.replace(secret, _MASK)
    return text


def _passwords(url: str) -> list[str]:
    """The password parts of ``url``, raw and percent-decoded, longest first."""
    _, _, rest = url.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = netloc.rpartition("@")
    found = [userinfo.partition(":")[2]] if at and ":" in userinfo else []
    query = rest.partition("?")[2].partition("#")[0]
    for param in query.split("&"):
        name, equals, value = param.partition("=")
        if equals and "password" in name.lower():
            found.append(value)
    secrets = {form for value in found for form in (value, unquote(value)) if form}
    return sorted(secrets, key=len, reverse=True)
