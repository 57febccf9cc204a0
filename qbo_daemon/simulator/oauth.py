"""The Intuit simulator's OAuth endpoints, in Intuit's wire format.

``GET /connect/oauth2`` (authorization), ``POST /oauth2/v1/tokens/bearer``
(token) and ``POST /v2/oauth2/tokens/revoke`` (revocation): Basic client
authentication, form-encoded token requests, the opt-in hard expiry header,
PKCE (S256: an authorization with a ``code_challenge`` makes its code need the
``code_verifier``), an ``intuit_tid`` header on every answer, and a pending
fault answering in place of any of them. A refresh that presents a token
another call is still being answered for (``concurrent_use``), or a value
already rotated out (``stale_use``), is answered as ever and flagged in the log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Final

from aiohttp import web
from yarl import URL

from qbo_daemon.core.clock import Clock
from qbo_daemon.simulator.faults import Fault, FaultPlan, fault_response
from qbo_daemon.simulator.grants import Grants
from qbo_daemon.simulator.log import RequestLog
from qbo_daemon.simulator.settings import SimulatorSettings

__all__ = ["OAuthEndpoints"]

_GRANT_TYPES: Final = {g: g for g in ("authorization_code", "refresh_token")}
_HARD_EXPIRY_HEADER: Final = "x-include-refresh-token-hard-expires-in"
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# BASE64URL(SHA-256(verifier)) without padding: always 43 characters.
_CHALLENGE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


class OAuthEndpoints:
    """The three handlers, over the grants, the faults and the log they share.

    ``clock`` drives every expiry; latency and hangs use real time. A hang
    ends once ``closing()`` is true.
    """

    def __init__(
        self,
        settings: SimulatorSettings,
        clock: Clock,
        grants: Grants,
        faults: FaultPlan,
        log: RequestLog,
        closing: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._grants = grants
        self._faults = faults
        self._log = log
        self._closing = closing
        self._tid_prefix = f"1-{secrets.token_hex(4)}-"
        self._tid_seq = itertools.count(1)
        self._answering = _Answering()
        self._basic_for: tuple[str, str] | None = None
        self._basic_header = ""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/connect/oauth2", self.authorize)
        app.router.add_post("/oauth2/v1/tokens/bearer", self.token)
        app.router.add_post("/v2/oauth2/tokens/revoke", self.revoke)

    async def stamp_tid(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: every answer, even a 404, carries an ``intuit_tid``."""
        if "intuit_tid" not in response.headers:
            response.headers["intuit_tid"] = self.new_tid()

    # -- authorization -------------------------------------------------------

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self.new_tid()
        fault = self._faults.take("authorize")
        if fault is not None:
            return await self.faulted(request, "authorize", fault, arrived, tid, None, None)
        query = request.query
        problem = self._authorize_problem(query)
        if problem is not None:
            self._log.record("authorize", arrived, tid, 400, error="invalid_request")
            return web.Response(
                status=400, text=f"400 Bad Request: {problem}\n", headers={"intuit_tid": tid}
            )
        params: dict[str, str] = {}
        realm_id: str | None = None
        if self._faults.take_denial():
            params["error"] = "access_denied"
        else:
            code, realm_id = self._grants.issue_code(
                query["redirect_uri"],
                arrived.timestamp(),
                code_challenge=query.get("code_challenge"),
            )
            params["code"] = code
        if "state" in query:
            params["state"] = query["state"]
        if realm_id is not None:
            params["realmId"] = realm_id
        location = URL(query["redirect_uri"]).update_query(params)
        error = params.get("error")
        self._log.record("authorize", arrived, tid, 302, error=error, realm_id=realm_id)
        return web.Response(status=302, headers={"Location": str(location), "intuit_tid": tid})

    def _authorize_problem(self, query: Mapping[str, str]) -> str | None:
        if query.get("client_id") != self.settings.client_id:
            return "unknown client_id"
        if query.get("response_type") != "code":
            return "response_type must be 'code'"
        if not query.get("scope"):
            return "scope is required"
        redirect_uri = query.get("redirect_uri", "")
        try:
            url = URL(redirect_uri)
        except ValueError:
            return "redirect_uri is not a valid URL"
        if not redirect_uri or url.scheme not in ("http", "https") or not url.host:
            return "redirect_uri must be an absolute http(s) URL"
        return _pkce_problem(query)

    # -- token ---------------------------------------------------------------

    async def token(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self.new_tid()
        fault = self._faults.take("token")
        form = await request.post()
        raw_grant = form.get("grant_type")
        grant_type = _GRANT_TYPES.get(raw_grant, raw_grant) if isinstance(raw_grant, str) else None
        presented = _text(form.get("refresh_token"))
        watched = presented if grant_type == "refresh_token" and presented else None
        with self._answering.enter(watched) as concurrent:
            if self.settings.latency > 0:
                await asyncio.sleep(self.settings.latency)
            # Judged when the simulator looks the value up, as Intuit would.
            stale = watched is not None and self._grants.was_rotated_out(watched)
            if fault is not None:
                return await self.faulted(
                    request,
                    "token",
                    fault,
                    arrived,
                    tid,
                    grant_type,
                    presented,
                    concurrent_use=concurrent,
                    stale_use=stale,
                )
            return self._token_answer(
                request, form, arrived, tid, grant_type, presented, concurrent, stale
            )

    def _token_answer(
        self,
        request: web.Request,
        form: Mapping[str, object],
        arrived: datetime,
        tid: str,
        grant_type: str | None,
        presented: str | None,
        concurrent: bool,
        stale: bool,
    ) -> web.Response:
        now = self._clock.now().timestamp()
        include_hard = request.headers.get(_HARD_EXPIRY_HEADER, "").lower() == "true"
        realm_id: str | None = None
        if not self._client_ok(request):
            status, body = 401, {"error": "invalid_client"}
        elif grant_type == "refresh_token":
            status, body, rotated = self._grants.refresh(presented, now, include_hard)
            if rotated:
                self._log.count("token", "rotated")
        elif grant_type == "authorization_code":
            status, body, realm_id = self._grants.exchange_code(
                _text(form.get("code")),
                _text(form.get("redirect_uri")),
                now,
                include_hard,
                _text(form.get("code_verifier")),
            )
        elif grant_type is None:
            status, body = 400, {"error": "invalid_request"}
        else:
            status, body = 400, {"error": "unsupported_grant_type"}

        self._log.record(
            "token",
            arrived,
            tid,
            status,
            grant_type=grant_type,
            presented=presented,
            issued=body.get("refresh_token") if status == 200 else None,
            error=body.get("error"),
            realm_id=realm_id,
            concurrent_use=concurrent,
            stale_use=stale,
        )
        return web.json_response(body, status=status, headers={"intuit_tid": tid, **_NO_STORE})

    # -- revoke --------------------------------------------------------------

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self.new_tid()
        fault = self._faults.take("revoke")
        try:
            payload = await request.json() if request.can_read_body else None
        except ValueError:
            payload = None
        token = _text(payload.get("token")) if isinstance(payload, dict) else None
        presented = token if token is not None and self._grants.is_refresh_token(token) else None
        if self.settings.latency > 0:
            await asyncio.sleep(self.settings.latency)
        if fault is not None:
            return await self.faulted(request, "revoke", fault, arrived, tid, None, presented)

        now = self._clock.now().timestamp()
        realm_id: str | None = None
        body: dict[str, str] | None
        if not self._client_ok(request):
            status, body = 401, {"error": "invalid_client"}
        elif not token:
            status, body = 400, {"error": "invalid_request"}
        else:
            revoked, realm_id = self._grants.revoke(token, now)
            # Intuit answers 400 with an empty body for an unknown or already revoked token.
            status, body = (200, None) if revoked else (400, None)
        self._log.record(
            "revoke",
            arrived,
            tid,
            status,
            presented=presented,
            error=body.get("error") if body else ("invalid_token" if status == 400 else None),
            realm_id=realm_id,
        )
        if body is None:
            return web.Response(status=status, headers={"intuit_tid": tid})
        return web.json_response(body, status=status, headers={"intuit_tid": tid})

    # -- shared --------------------------------------------------------------

    async def faulted(
        self,
        request: web.Request,
        endpoint: str,
        fault: Fault,
        arrived: datetime,
        tid: str,
        grant_type: str | None,
        presented: str | None,
        *,
        concurrent_use: bool = False,
        stale_use: bool = False,
    ) -> web.StreamResponse:
        """Answer with ``fault`` and change no state: no code used, no token rotated."""
        unanswered = fault.kind in ("hang", "reset")
        if unanswered:  # logged before the wait, so a test can see the call is held
            self._log.record(
                endpoint,
                arrived,
                tid,
                0,
                grant_type=grant_type,
                presented=presented,
                fault=fault.kind,
                concurrent_use=concurrent_use,
                stale_use=stale_use,
            )
        response = await fault_response(
            request,
            fault,
            tid,
            presented,
            expires_in=self.settings.expires_in,
            closing=self._closing,
        )
        if not unanswered:
            self._log.record(
                endpoint,
                arrived,
                tid,
                response.status,
                grant_type=grant_type,
                presented=presented,
                error=fault.kind if fault.kind in ("invalid_grant", "invalid_client") else None,
                fault=fault.kind,
                concurrent_use=concurrent_use,
                stale_use=stale_use,
            )
        return response

    def _client_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        if header is None:
            return False
        settings = self.settings
        wanted = (settings.client_id, settings.client_secret)
        if self._basic_for != wanted:
            pair = f"{settings.client_id}:{settings.client_secret}".encode()
            self._basic_header = "Basic " + base64.b64encode(pair).decode("ascii")
            self._basic_for = wanted
        if header == self._basic_header:  # the fast path; timing safety is moot here
            return True
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return decoded == f"{settings.client_id}:{settings.client_secret}"

    def new_tid(self) -> str:
        """A fresh ``intuit_tid``, unique within this simulator."""
        return f"{self._tid_prefix}{next(self._tid_seq):012x}"


class _Answering:
    """The refresh tokens presented by calls still being answered (held ones included)."""

    def __init__(self) -> None:
        self._calls: Counter[str] = Counter()

    @contextmanager
    def enter(self, token: str | None) -> Iterator[bool]:
        """Count a call presenting ``token`` while it is answered; yield whether another is."""
        if token is None:
            yield False
            return
        concurrent = self._calls[token] > 0
        self._calls[token] += 1
        try:
            yield concurrent
        finally:
            self._calls[token] -= 1
            if not self._calls[token]:
                del self._calls[token]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _pkce_problem(query: Mapping[str, str]) -> str | None:
    """RFC 7636 on the authorization request; only S256 is supported (not ``plain``)."""
    challenge = query.get("code_challenge")
    method = query.get("code_challenge_method")
    if challenge is None:
        return "code_challenge_method without code_challenge" if method is not None else None
    if method != "S256":
        return "code_challenge_method must be 'S256'"
    if not _CHALLENGE.fullmatch(challenge):
        return "code_challenge must be 43 characters of base64url"
    return None
