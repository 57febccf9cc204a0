"""Signed session cookies and CSRF tokens for the status page. No I/O, no store.

A person signs in with one of the configured API keys. The cookie holds no key,
only a short id of it, an expiry, a random session id and an HMAC over those
three under a key derived from the API key:

    v1.<key id>.<expires, unix seconds>.<session id>.<mac>

Any daemon configured with the same API key can check it (several daemons on one
database share nothing else), and removing the key from the configuration ends
every session signed in with it. A CSRF token is an HMAC of the session id under
another key derived from the same API key, so it needs no storage either.
Every comparison of a presented value is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from qbo_daemon.core.models import Secret

SESSION_TTL = timedelta(hours=8)
COOKIE_NAME = "qbo_ui_session"
_VERSION = "v1"
_KEY_ID_CONTEXT = b"qbo-daemon ui: key id"
_SESSION_CONTEXT = b"qbo-daemon ui: session mac"
_CSRF_CONTEXT = b"qbo-daemon ui: csrf token"
_KEY_ID_LENGTH = 12  # hex digits
_COOKIE = re.compile(r"v1\.([0-9a-f]{12})\.([0-9]{1,12})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in person: which key they used (by id only), and until when."""

    key_id: str
    session_id: str
    expires_at: int  # unix seconds
    _key: Secret  # the API key, to derive the CSRF token; never shown

    def csrf_token(self) -> str:
        return _mac(self._key, _CSRF_CONTEXT, self.session_id)

    def csrf_ok(self, presented: str | None) -> bool:
        """Whether a form's token is this session's (constant-time)."""
        expected = self.csrf_token().encode()
        return hmac.compare_digest(expected, (presented or "").encode("utf-8", "surrogateescape"))


def key_id(key: Secret) -> str:
    """A short, stable id of an API key: names the key in a cookie and a log line."""
    return hmac.new(key.reveal().encode(), _KEY_ID_CONTEXT, hashlib.sha256).hexdigest()[
        :_KEY_ID_LENGTH
    ]


def matching_key(keys: Iterable[Secret], presented: str) -> Secret | None:
    """The configured key equal to ``presented``, compared in constant time against all."""
    given = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    found: Secret | None = None
    for key in keys:
        if hmac.compare_digest(given, hashlib.sha256(key.reveal().encode()).digest()):
            found = key
    return found if presented else None


def issue(key: Secret, now: datetime, ttl: timedelta = SESSION_TTL) -> tuple[str, Session]:
    """A new session for a person who presented ``key``: (cookie value, session)."""
    session_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
    expires = int((now + ttl).timestamp())
    kid = key_id(key)
    body = f"{_VERSION}.{kid}.{expires}.{session_id}"
    return f"{body}.{_mac(key, _SESSION_CONTEXT, body)}", Session(kid, session_id, expires, key)


def verify(cookie: str | None, keys: Iterable[Secret], now: datetime) -> Session | None:
    """The session of a cookie that is well-formed, signed by a configured key, not expired."""
    match = _COOKIE.fullmatch(cookie or "")
    if match is None:
        return None
    kid, expires_text, session_id, mac = match.groups()
    key = next((k for k in keys if hmac.compare_digest(key_id(k), kid)), None)
    if key is None:
        return None  # signed with a key that is no longer configured
    body = f"{_VERSION}.{kid}.{expires_text}.{session_id}"
    if not hmac.compare_digest(_mac(key, _SESSION_CONTEXT, body), mac):
        return None
    expires = int(expires_text)
    if expires <= now.timestamp():
        return None
    return Session(kid, session_id, expires, key)


def _mac(key: Secret, context: bytes, message: str) -> str:
    derived = hmac.new(key.reveal().encode(), context, hashlib.sha256).digest()
    digest = hmac.new(derived, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
