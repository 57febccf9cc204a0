"""The Intuit simulator's model: connections, codes, refresh token rotation and expiry.

No I/O: every method that depends on time takes ``now`` (epoch seconds), and
answers come back as ``(status, body)`` in Intuit's wire format, for the HTTP
layer to send as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from qbo_daemon.simulator.settings import SimulatorSettings

__all__ = ["INVALID_REFRESH_TOKEN", "Grants"]

# Revocation by access token only needs the recent ones; older ones are
# forgotten so that a long benchmark does not keep millions of them.
_ACCESS_TOKENS_PER_CONNECTION: Final = 8

INVALID_REFRESH_TOKEN: Final = {
    "error": "invalid_grant",
    "error_description": "Incorrect or invalid refresh token",
}


@dataclass(slots=True, eq=False)
class _Connection:
    """One authorized company: the state Intuit keeps behind a refresh token."""

    realm_id: str
    authorized_at: float
    refresh_token: str
    refresh_issued_at: float
    refresh_expires_at: float
    alive: bool = True
    access_tokens: deque[str] = field(
        default_factory=lambda: deque(maxlen=_ACCESS_TOKENS_PER_CONNECTION)
    )


@dataclass(slots=True, eq=False)
class _Code:
    redirect_uri: str
    realm_id: str
    expires_at: float
    connection: _Connection | None = None  # set once exchanged, to spot a replay
    code_challenge: str | None = None  # PKCE S256, when the authorization carried one


class Grants:
    """Every connection, code and token the simulator has handed out.

    Lifetimes are read from ``settings`` at each call, so a test can change
    them at run time.
    """

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self._refresh: dict[str, _Connection] = {}
        self._access: dict[str, tuple[_Connection, float]] = {}
        self._codes: dict[str, _Code] = {}
        self._realms: set[str] = set()
        self._connections: list[_Connection] = []
        # Every refresh token value rotated out, as its hash(): a stale use is told
        # apart from garbage at about 60 bytes a rotation.
        self._rotated_out: set[int] = set()
        # Companies the next users pick on the consent screen, in order.
        self._chosen_realms: deque[str] = deque()

    # -- in-process control --------------------------------------------------

    def grant(self, realm_id: str | None, now: float) -> dict[str, Any]:
        """A new connection's token answer (hard expiry included) plus ``realm_id``."""
        conn = self._connect(realm_id if realm_id is not None else self._new_realm(), now)
        answer = self._answer(conn, self._new_access(conn, now), now, include_hard=True)
        answer["realm_id"] = conn.realm_id
        return answer

    def invalidate(self, token: str) -> None:
        """Kill the connection of a current refresh token or a recent access token."""
        conn = self._refresh.get(token)
        if conn is None and token in self._access:
            conn = self._access[token][0]
        if conn is None:
            raise KeyError("unknown refresh token")
        conn.alive = False

    def is_access_token_valid(self, access_token: str, now: float) -> bool:
        return self.access_realm(access_token, now) is not None

    def access_realm(self, access_token: str, now: float) -> str | None:
        """The company a live access token was granted for; None if it is unknown or dead."""
        found = self._access.get(access_token)
        if found is None or not found[0].alive or now >= found[1]:
            return None
        return found[0].realm_id

    def choose_realm(self, realm_id: str) -> None:
        """The next user to consent picks this company (one already connected, say)."""
        self._realms.add(realm_id)
        self._chosen_realms.append(realm_id)

    def connection_counts(self) -> dict[str, int]:
        live = sum(1 for c in self._connections if c.alive)
        return {"live": live, "dead": len(self._connections) - live}

    # -- the grants ----------------------------------------------------------

    def issue_code(
        self, redirect_uri: str, now: float, *, code_challenge: str | None = None
    ) -> tuple[str, str]:
        """A new authorization code: ``(code, realm_id)``.

        The company is a new one, unless :meth:`choose_realm` picked one.
        ``code_challenge`` (PKCE S256) binds the code to its verifier.
        """
        self._forget_expired_codes(now)
        code = "sim-ac-" + secrets.token_urlsafe(24)
        realm_id = self._chosen_realms.popleft() if self._chosen_realms else self._new_realm()
        self._codes[code] = _Code(
            redirect_uri,
            realm_id,
            now + self.settings.code_lifetime,
            code_challenge=code_challenge,
        )
        return code, realm_id

    def exchange_code(
        self,
        code: str | None,
        redirect_uri: str | None,
        now: float,
        include_hard: bool,
        code_verifier: str | None = None,
    ) -> tuple[int, dict[str, Any], str | None]:
        """The ``authorization_code`` grant: ``(status, body, realm_id)``.

        A code issued with a PKCE challenge needs the matching verifier; a wrong
        or missing one is ``invalid_grant`` and leaves the code unused.
        """
        if not code or not redirect_uri:
            return 400, {"error": "invalid_request"}, None
        entry = self._codes.get(code)
        if entry is None or now >= entry.expires_at:
            return 400, {"error": "invalid_grant"}, None
        if entry.connection is not None:
            if self.settings.kill_on_code_reuse:
                entry.connection.alive = False
            return 400, {"error": "invalid_grant"}, entry.realm_id
        if entry.redirect_uri != redirect_uri:
            return 400, {"error": "invalid_grant"}, None
        if entry.code_challenge is not None and not _verifier_matches(
            code_verifier, entry.code_challenge
        ):
            body = {"error": "invalid_grant", "error_description": "PKCE verification failed"}
            return 400, body, None
        conn = self._connect(entry.realm_id, now)
        entry.connection = conn
        answer = self._answer(conn, self._new_access(conn, now), now, include_hard)
        return 200, answer, conn.realm_id

    def refresh(
        self, presented: str | None, now: float, include_hard: bool
    ) -> tuple[int, dict[str, Any], bool]:
        """The ``refresh_token`` grant: ``(status, body, rotated)``."""
        if not presented:
            return 400, {"error": "invalid_request"}, False
        conn = self._refresh.get(presented)
        if conn is None:
            return 400, dict(INVALID_REFRESH_TOKEN), False
        if not conn.alive:
            return 400, {"error": "invalid_grant", "error_description": "Token invalid"}, False
        hard_at = self._hard_at(conn)
        if now >= conn.refresh_expires_at or (hard_at is not None and now >= hard_at):
            return 400, dict(INVALID_REFRESH_TOKEN), False
        rotated = now - conn.refresh_issued_at >= self.settings.rotate_after
        if rotated:
            # The old value dies at once (the worse of Intuit's two stories).
            del self._refresh[presented]
            self._rotated_out.add(hash(presented))
            conn.refresh_token = self._new_refresh_token()
            conn.refresh_issued_at = now
            conn.refresh_expires_at = self._refresh_expiry(conn, now)
            self._refresh[conn.refresh_token] = conn
        return 200, self._answer(conn, self._new_access(conn, now), now, include_hard), rotated

    def was_rotated_out(self, token: str) -> bool:
        """Whether ``token`` is a refresh token value issued once and rotated out since."""
        return token not in self._refresh and hash(token) in self._rotated_out

    def is_refresh_token(self, token: str) -> bool:
        """Whether ``token`` is some connection's current refresh token (dead or alive)."""
        return token in self._refresh

    def revoke(self, token: str, now: float) -> tuple[bool, str | None]:
        """Kill the connection of a refresh or unexpired access token.

        Returns whether it was alive until now, and its realm (None if the
        token is unknown).
        """
        conn = self._refresh.get(token)
        if conn is None:
            found = self._access.get(token)
            conn = found[0] if found is not None and now < found[1] else None
        if conn is None:
            return False, None
        was_alive = conn.alive
        conn.alive = False
        return was_alive, conn.realm_id

    # -- helpers -------------------------------------------------------------

    def _connect(self, realm_id: str, now: float) -> _Connection:
        conn = _Connection(
            realm_id=realm_id,
            authorized_at=now,
            refresh_token=self._new_refresh_token(),
            refresh_issued_at=now,
            refresh_expires_at=now,
        )
        conn.refresh_expires_at = self._refresh_expiry(conn, now)
        self._refresh[conn.refresh_token] = conn
        self._connections.append(conn)
        return conn

    def _hard_at(self, conn: _Connection) -> float | None:
        # Read from the settings at each call, so a test can shorten it at run time.
        hard = self.settings.hard_expires_in
        return None if hard is None else conn.authorized_at + hard

    def _refresh_expiry(self, conn: _Connection, now: float) -> float:
        expires_at = now + self.settings.refresh_expires_in
        hard_at = self._hard_at(conn)
        return expires_at if hard_at is None else min(expires_at, hard_at)

    def _new_access(self, conn: _Connection, now: float) -> str:
        token = "sim-at-" + secrets.token_urlsafe(32)
        if len(conn.access_tokens) == conn.access_tokens.maxlen:
            self._access.pop(conn.access_tokens[0], None)
        conn.access_tokens.append(token)
        self._access[token] = (conn, now + self.settings.expires_in)
        return token

    @staticmethod
    def _new_refresh_token() -> str:
        return "sim-rt-" + secrets.token_urlsafe(24)

    def _new_realm(self) -> str:
        while True:
            realm_id = str(10**18 + secrets.randbelow(9 * 10**18))
            if realm_id not in self._realms:
                self._realms.add(realm_id)
                return realm_id

    def _answer(
        self, conn: _Connection, access_token: str, now: float, include_hard: bool
    ) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "access_token": access_token,
            "refresh_token": conn.refresh_token,
            "token_type": "bearer",
            "expires_in": self.settings.expires_in,
            "x_refresh_token_expires_in": max(0, int(conn.refresh_expires_at - now)),
        }
        hard_at = self._hard_at(conn)
        if include_hard and hard_at is not None:
            answer["x_refresh_token_hard_expires_in"] = max(0, int(hard_at - now))
        return answer

    def _forget_expired_codes(self, now: float) -> None:
        # Codes are kept in issue order, which is expiry order while code_lifetime holds.
        expired = []
        for code, entry in self._codes.items():
            if entry.expires_at > now:
                break
            expired.append(code)
        for code in expired:
            del self._codes[code]


def _verifier_matches(verifier: str | None, challenge: str) -> bool:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(verifier))) without padding equals the challenge."""
    if not verifier or not verifier.isascii():
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return hmac.compare_digest(computed, challenge)
