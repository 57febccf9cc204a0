"""An Intuit OAuth 2.0 stand-in: the authorization, token and revocation endpoints.

It speaks Intuit's wire format as the field notes describe it: Basic client
authentication, form-encoded token requests, ``x_refresh_token_expires_in``
counting down between rotations, the opt-in ``x_refresh_token_hard_expires_in``,
a refresh token that rotates after ``rotate_after`` seconds and whose old value
dies at once, ``invalid_grant`` for every dead token or code, and an
``intuit_tid`` header on every answer. Faults (5xx, nginx HTML pages, 429,
hangs, dropped connections, garbled bodies) are injected per endpoint, in
process or over the ``/_sim/`` control API. The tests, ``qbo-daemon demo``, the
benchmark and ``qbo-daemon simulator --port N`` all run it.

It keeps and shows test secrets in plain text (the request log and the control
API return them): never give it a real client secret.

Throughput: about 10,000 refresh calls per second (7,400-12,300 over three
5-second runs) with the simulator alone in its process, driven from another
process by one aiohttp ``ClientSession`` with 64 concurrent requests; the
simulator used only 50-67 % of one core meanwhile, so the client was the limit.
About 5,100/s when client and simulator share one process. Python 3.11,
aiohttp 3.14, no latency, no faults.

Memory stays bounded on long runs: ``request_log`` keeps at most ``log_limit``
entries (default 1,000,000, about 330 bytes each, so ~330 MB when full; the
oldest tenth is dropped at once when the limit is passed), each connection
remembers only its last 8 access tokens, and used authorization codes are
forgotten once expired.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import math
import secrets
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Final

import structlog
from aiohttp import web
from yarl import URL

from qbo_daemon.clock import Clock, SystemClock
from qbo_daemon.models import iso

__all__ = [
    "DEFAULT_LOG_LIMIT",
    "ENDPOINTS",
    "FAULT_KINDS",
    "SIMULATOR_KEY",
    "IntuitSimulator",
    "RequestLogEntry",
    "SimulatorSettings",
    "serve_simulator",
]

ENDPOINTS: Final = ("authorize", "token", "revoke")
FAULT_KINDS: Final = frozenset(
    {
        "500",
        "502_html",
        "html",
        "503",
        "429",
        "hang",
        "malformed",
        "no_token",
        "invalid_grant",
        "invalid_client",
        "reset",
    }
)
DEFAULT_LOG_LIMIT: Final = 1_000_000
DEFAULT_RETRY_AFTER: Final = 2.0
HANG_SECONDS: Final = 3600.0
_HANG_POLL: Final = 0.05
# Revocation by access token only needs the recent ones; older ones are
# forgotten so that a long benchmark does not keep millions of them.
_ACCESS_TOKENS_PER_CONNECTION: Final = 8
_SHUTDOWN_TIMEOUT: Final = 2.0
# Most connections one POST /_sim/grants {"count": N} mints (a few MB of JSON).
MAX_BULK_GRANTS: Final = 10_000

_GRANT_TYPES: Final = {g: g for g in ("authorization_code", "refresh_token")}
_HARD_EXPIRY_HEADER: Final = "x-include-refresh-token-hard-expires-in"
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_INVALID_RT: Final = {
    "error": "invalid_grant",
    "error_description": "Incorrect or invalid refresh token",
}
_NGINX_PAGE: Final = (
    "<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n"
    "<center><h1>{status}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_MALFORMED_BODY: Final = '{"access_token":"sim-at-garbled","refresh_token":"sim-rt-gar'

# Field name -> accepted types, for run-time updates (``bool`` is never an int here).
_SETTING_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "client_id": (str,),
    "client_secret": (str,),
    "expires_in": (int,),
    "refresh_expires_in": (int,),
    "hard_expires_in": (int, type(None)),
    "rotate_after": (int, float),
    "latency": (int, float),
    "code_lifetime": (int, float),
    "kill_on_code_reuse": (bool,),
}


@dataclass
class SimulatorSettings:
    """How the simulator answers. Mutable at run time (prefer :meth:`update`)."""

    client_id: str = "sim-client-id"
    client_secret: str = "sim-client-secret"  # noqa: S105 - a test stand-in's own secret
    expires_in: int = 3600
    """Access token lifetime sent in answers."""
    refresh_expires_in: int = 8_726_400
    """Life of a fresh refresh token value; ``x_refresh_token_expires_in`` counts it down."""
    hard_expires_in: int | None = 5 * 365 * 86400
    """Counted from the first authorization; sent only when the client asks by header."""
    rotate_after: float = 86_400.0
    """Age at which a refresh returns a new refresh token value; 0 rotates every time."""
    latency: float = 0.0
    """Seconds each token or revoke call waits before answering."""
    code_lifetime: float = 600.0
    kill_on_code_reuse: bool = True
    """A replayed code also kills the connection it made (RFC 6749 4.1.2; the worse case)."""

    def __post_init__(self) -> None:
        for item in fields(self):
            _check_setting(item.name, getattr(self, item.name))

    def update(self, **changes: Any) -> None:
        """Validate every change first, then apply all of them (or none)."""
        for name, value in changes.items():
            _check_setting(name, value)
        for name, value in changes.items():
            setattr(self, name, value)


def _check_setting(name: str, value: Any) -> None:
    kinds = _SETTING_TYPES.get(name)
    if kinds is None:
        raise ValueError(f"unknown setting {name!r}")
    # bool is an int subclass: accept it only where a bool is wanted.
    if isinstance(value, bool) is not (bool in kinds) or not isinstance(value, kinds):
        raise ValueError(f"setting {name!r} must be {_type_names(kinds)}, not {value!r}")
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (not math.isfinite(value) or value < 0)
    ):
        raise ValueError(f"setting {name!r} must be a finite number >= 0, not {value!r}")
    if name == "client_id" and not value:
        raise ValueError("setting 'client_id' must not be empty")


def _type_names(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


@dataclass(slots=True)
class RequestLogEntry:
    """One call the simulator received. ``status`` 0 means no answer was sent."""

    at: datetime
    endpoint: str
    grant_type: str | None
    presented_refresh_token: str | None
    issued_refresh_token: str | None
    status: int
    error: str | None
    fault: str | None
    intuit_tid: str
    realm_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = iso(self.at)
        return data


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


@dataclass(slots=True)
class _Fault:
    kind: str
    remaining: int
    retry_after: float | None


class IntuitSimulator:
    """Intuit's OAuth endpoints in one aiohttp app, with fault injection.

    ``clock`` drives every expiry (codes, access and refresh tokens, rotation,
    hard expiry); latency and hangs use real time. ``base_url`` is set by
    :meth:`start`; set it yourself when serving :meth:`make_app` another way.
    """

    def __init__(
        self,
        settings: SimulatorSettings | None = None,
        clock: Clock | None = None,
        *,
        log_limit: int = DEFAULT_LOG_LIMIT,
    ) -> None:
        if log_limit < 1:
            raise ValueError("log_limit must be at least 1")
        self.settings = settings if settings is not None else SimulatorSettings()
        self.log_limit = log_limit
        self.request_log: list[RequestLogEntry] = []
        self.base_url = ""
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._refresh: dict[str, _Connection] = {}
        self._access: dict[str, tuple[_Connection, float]] = {}
        self._codes: dict[str, _Code] = {}
        self._realms: set[str] = set()
        self._connections: list[_Connection] = []
        self._faults: dict[str, deque[_Fault]] = {e: deque() for e in ENDPOINTS}
        self._denials = 0
        self._counts: dict[str, Counter[str]] = {e: Counter() for e in ENDPOINTS}
        self._tid_prefix = f"1-{secrets.token_hex(4)}-"
        self._tid_seq = itertools.count(1)
        self._basic_for: tuple[str, str] | None = None
        self._basic_header = ""
        self._runner: web.AppRunner | None = None
        self._closing = False

    # -- endpoints -----------------------------------------------------------

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.base_url}/connect/oauth2"

    @property
    def token_endpoint(self) -> str:
        return f"{self.base_url}/oauth2/v1/tokens/bearer"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.base_url}/v2/oauth2/tokens/revoke"

    # -- lifecycle -----------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app[SIMULATOR_KEY] = self
        app.router.add_get("/connect/oauth2", self._authorize)
        app.router.add_post("/oauth2/v1/tokens/bearer", self._token)
        app.router.add_post("/v2/oauth2/tokens/revoke", self._revoke)
        control: list[tuple[str, str, Callable[[web.Request], Awaitable[web.Response]]]] = [
            ("POST", "/_sim/faults", self._sim_faults),
            ("POST", "/_sim/deny", self._sim_deny),
            ("POST", "/_sim/grants", self._sim_grants),
            ("POST", "/_sim/invalidate", self._sim_invalidate),
            ("GET", "/_sim/log", self._sim_log),
            ("GET", "/_sim/stats", self._sim_stats),
            ("POST", "/_sim/reset", self._sim_reset),
            ("GET", "/_sim/settings", self._sim_settings),
            ("POST", "/_sim/settings", self._sim_settings),
        ]
        for method, path, handler in control:
            app.router.add_route(method, path, _control(handler))
        app.on_response_prepare.append(self._stamp_tid)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port); return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        self._closing = False
        # No access log: it costs a good share of the throughput.
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.base_url = f"http://{_url_host(host)}:{bound_port}"
        return self.base_url

    async def close(self) -> None:
        """Stop listening; hung calls are released. Safe to call twice."""
        self._closing = True
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- in-process control --------------------------------------------------

    def inject(
        self,
        kind: str,
        count: int = 1,
        *,
        endpoint: str = "token",
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``count`` calls of ``endpoint`` with fault ``kind``."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {list(ENDPOINTS)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, not {count!r}")
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, int | float)
            or not math.isfinite(retry_after)
            or retry_after < 0
        ):
            raise ValueError(f"retry_after must be a number >= 0, not {retry_after!r}")
        self._faults[endpoint].append(_Fault(kind, count, retry_after))

    def deny_next_authorization(self) -> None:
        """The next authorization is declined by the user (``error=access_denied``)."""
        self._denials += 1

    def grant(self, realm_id: str | None = None) -> dict[str, Any]:
        """Mint a connection without a browser: its token answer plus ``realm_id``.

        The answer always carries ``x_refresh_token_hard_expires_in`` (unless
        ``hard_expires_in`` is None): there is no request header to opt in with.
        """
        now = self._clock.now().timestamp()
        conn = self._connect(realm_id if realm_id is not None else self._new_realm(), now)
        answer = self._answer(conn, self._new_access(conn, now), now, include_hard=True)
        answer["realm_id"] = conn.realm_id
        return answer

    def invalidate(self, refresh_token: str) -> None:
        """The user disconnected the app inside QuickBooks: the connection's tokens die.

        Accepts a connection's current refresh token (or one of its recent
        access tokens); a rotated-out or unknown value raises ``KeyError``.
        """
        conn = self._refresh.get(refresh_token)
        if conn is None and refresh_token in self._access:
            conn = self._access[refresh_token][0]
        if conn is None:
            raise KeyError("unknown refresh token")
        conn.alive = False

    def is_access_token_valid(self, access_token: str) -> bool:
        """Whether a QuickBooks API call with this bearer token would be accepted."""
        found = self._access.get(access_token)
        return found is not None and found[0].alive and self._clock.now().timestamp() < found[1]

    def stats(self) -> dict[str, Any]:
        """Calls per endpoint and outcome (``ok``, an error code, ``fault:<kind>``,
        ``rotated``), plus connections and pending faults."""
        live = sum(1 for c in self._connections if c.alive)
        return {
            **{endpoint: dict(counts) for endpoint, counts in self._counts.items()},
            "connections": {"live": live, "dead": len(self._connections) - live},
            "pending_faults": {
                endpoint: [
                    {"kind": f.kind, "count": f.remaining, "retry_after": f.retry_after}
                    for f in queue
                ]
                for endpoint, queue in self._faults.items()
            },
            "pending_denials": self._denials,
            "log_entries": len(self.request_log),
        }

    def reset(self) -> None:
        """Forget pending faults and denials, the log and the counts; keep the grants."""
        for queue in self._faults.values():
            queue.clear()
        for counts in self._counts.values():
            counts.clear()
        self._denials = 0
        self.request_log.clear()

    # -- HTTP: authorization -------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self._new_tid()
        fault = self._take_fault("authorize")
        if fault is not None:
            return await self._faulted(request, "authorize", fault, arrived, tid, None, None)
        query = request.query
        problem = self._authorize_problem(query)
        if problem is not None:
            self._record("authorize", arrived, tid, 400, error="invalid_request")
            return web.Response(
                status=400, text=f"400 Bad Request: {problem}\n", headers={"intuit_tid": tid}
            )
        params: dict[str, str] = {}
        realm_id: str | None = None
        if self._denials:
            self._denials -= 1
            params["error"] = "access_denied"
        else:
            self._forget_expired_codes(arrived.timestamp())
            code = "sim-ac-" + secrets.token_urlsafe(24)
            realm_id = self._new_realm()
            self._codes[code] = _Code(
                query["redirect_uri"],
                realm_id,
                arrived.timestamp() + self.settings.code_lifetime,
            )
            params["code"] = code
        if "state" in query:
            params["state"] = query["state"]
        if realm_id is not None:
            params["realmId"] = realm_id
        location = URL(query["redirect_uri"]).update_query(params)
        error = params.get("error")
        self._record("authorize", arrived, tid, 302, error=error, realm_id=realm_id)
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
        return None

    # -- HTTP: token ---------------------------------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self._new_tid()
        fault = self._take_fault("token")
        form = await request.post()
        raw_grant = form.get("grant_type")
        grant_type = _GRANT_TYPES.get(raw_grant, raw_grant) if isinstance(raw_grant, str) else None
        presented = _text(form.get("refresh_token"))
        if self.settings.latency > 0:
            await asyncio.sleep(self.settings.latency)
        if fault is not None:
            return await self._faulted(request, "token", fault, arrived, tid, grant_type, presented)

        now = self._clock.now().timestamp()
        include_hard = request.headers.get(_HARD_EXPIRY_HEADER, "").lower() == "true"
        realm_id: str | None = None
        if not self._client_ok(request):
            status, body = 401, {"error": "invalid_client"}
        elif grant_type == "refresh_token":
            status, body = self._refresh_grant(presented, now, include_hard)
        elif grant_type == "authorization_code":
            status, body, realm_id = self._code_grant(
                _text(form.get("code")), _text(form.get("redirect_uri")), now, include_hard
            )
        elif grant_type is None:
            status, body = 400, {"error": "invalid_request"}
        else:
            status, body = 400, {"error": "unsupported_grant_type"}

        self._record(
            "token",
            arrived,
            tid,
            status,
            grant_type=grant_type,
            presented=presented,
            issued=body.get("refresh_token") if status == 200 else None,
            error=body.get("error"),
            realm_id=realm_id,
        )
        return web.json_response(body, status=status, headers={"intuit_tid": tid, **_NO_STORE})

    def _refresh_grant(
        self, presented: str | None, now: float, include_hard: bool
    ) -> tuple[int, dict[str, Any]]:
        if not presented:
            return 400, {"error": "invalid_request"}
        conn = self._refresh.get(presented)
        if conn is None:
            return 400, dict(_INVALID_RT)
        if not conn.alive:
            return 400, {"error": "invalid_grant", "error_description": "Token invalid"}
        hard_at = self._hard_at(conn)
        if now >= conn.refresh_expires_at or (hard_at is not None and now >= hard_at):
            return 400, dict(_INVALID_RT)
        if now - conn.refresh_issued_at >= self.settings.rotate_after:
            # The old value dies at once (the worse of Intuit's two stories).
            del self._refresh[presented]
            conn.refresh_token = self._new_refresh_token()
            conn.refresh_issued_at = now
            conn.refresh_expires_at = self._refresh_expiry(conn, now)
            self._refresh[conn.refresh_token] = conn
            self._counts["token"]["rotated"] += 1
        return 200, self._answer(conn, self._new_access(conn, now), now, include_hard)

    def _code_grant(
        self, code: str | None, redirect_uri: str | None, now: float, include_hard: bool
    ) -> tuple[int, dict[str, Any], str | None]:
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
        conn = self._connect(entry.realm_id, now)
        entry.connection = conn
        answer = self._answer(conn, self._new_access(conn, now), now, include_hard)
        return 200, answer, conn.realm_id

    # -- HTTP: revoke --------------------------------------------------------

    async def _revoke(self, request: web.Request) -> web.StreamResponse:
        arrived = self._clock.now()
        tid = self._new_tid()
        fault = self._take_fault("revoke")
        try:
            payload = await request.json() if request.can_read_body else None
        except ValueError:
            payload = None
        token = _text(payload.get("token")) if isinstance(payload, dict) else None
        presented = token if token is not None and token in self._refresh else None
        if self.settings.latency > 0:
            await asyncio.sleep(self.settings.latency)
        if fault is not None:
            return await self._faulted(request, "revoke", fault, arrived, tid, None, presented)

        now = self._clock.now().timestamp()
        conn: _Connection | None = None
        body: dict[str, str] | None
        if not self._client_ok(request):
            status, body = 401, {"error": "invalid_client"}
        elif not token:
            status, body = 400, {"error": "invalid_request"}
        else:
            conn = self._refresh.get(token)
            if conn is None:
                found = self._access.get(token)
                conn = found[0] if found is not None and now < found[1] else None
            # Intuit answers 400 with an empty body for an unknown or already revoked token.
            status, body = (200, None) if conn is not None and conn.alive else (400, None)
            if conn is not None:
                conn.alive = False
        self._record(
            "revoke",
            arrived,
            tid,
            status,
            presented=presented,
            error=body.get("error") if body else ("invalid_token" if status == 400 else None),
            realm_id=conn.realm_id if conn is not None else None,
        )
        if body is None:
            return web.Response(status=status, headers={"intuit_tid": tid})
        return web.json_response(body, status=status, headers={"intuit_tid": tid})

    # -- faults --------------------------------------------------------------

    def _take_fault(self, endpoint: str) -> _Fault | None:
        queue = self._faults[endpoint]
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    async def _faulted(
        self,
        request: web.Request,
        endpoint: str,
        fault: _Fault,
        arrived: datetime,
        tid: str,
        grant_type: str | None,
        presented: str | None,
    ) -> web.StreamResponse:
        """Answer with ``fault`` and change no state: no code used, no token rotated."""
        unanswered = fault.kind in ("hang", "reset")
        if unanswered:  # logged before the wait, so a test can see the call is held
            self._record(
                endpoint,
                arrived,
                tid,
                0,
                grant_type=grant_type,
                presented=presented,
                fault=fault.kind,
            )
        response = await self._fault_response(request, fault, tid, presented)
        if not unanswered:
            self._record(
                endpoint,
                arrived,
                tid,
                response.status,
                grant_type=grant_type,
                presented=presented,
                error=fault.kind if fault.kind in ("invalid_grant", "invalid_client") else None,
                fault=fault.kind,
            )
        return response

    async def _fault_response(
        self, request: web.Request, fault: _Fault, tid: str, presented: str | None
    ) -> web.StreamResponse:
        headers = {"intuit_tid": tid}
        kind = fault.kind
        if kind == "500":
            body = {"error": "internal_server_error", "error_description": "simulated fault"}
            return web.json_response(body, status=500, headers=headers)
        if kind in ("502_html", "html"):
            return _nginx_page(502, "Bad Gateway", headers)
        if kind in ("503", "429"):
            headers["Retry-After"] = _retry_after_text(fault.retry_after)
            if kind == "503":
                return _nginx_page(503, "Service Temporarily Unavailable", headers)
            body = {"error": "too_many_requests", "error_description": "simulated throttle"}
            return web.json_response(body, status=429, headers=headers)
        if kind == "malformed":
            return web.Response(
                text=_MALFORMED_BODY, content_type="application/json", headers=headers
            )
        if kind == "no_token":
            answer: dict[str, Any] = {
                "token_type": "bearer",
                "expires_in": self.settings.expires_in,
            }
            if presented is not None:
                answer["refresh_token"] = presented
            return web.json_response(answer, headers=headers)
        if kind == "invalid_grant":
            return web.json_response(dict(_INVALID_RT), status=400, headers=headers)
        if kind == "invalid_client":
            return web.json_response({"error": "invalid_client"}, status=401, headers=headers)
        if kind == "hang":
            await self._hang(request)
        return _drop_connection(request)

    async def _hang(self, request: web.Request) -> None:
        """Wait until the client gives up, the simulator closes, or an hour passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANG_SECONDS
        while not self._closing and loop.time() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(_HANG_POLL)

    # -- state helpers -------------------------------------------------------

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

    def _new_tid(self) -> str:
        return f"{self._tid_prefix}{next(self._tid_seq):012x}"

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

    def _record(
        self,
        endpoint: str,
        at: datetime,
        tid: str,
        status: int,
        *,
        grant_type: str | None = None,
        presented: str | None = None,
        issued: str | None = None,
        error: str | None = None,
        fault: str | None = None,
        realm_id: str | None = None,
    ) -> None:
        log = self.request_log
        log.append(
            RequestLogEntry(
                at, endpoint, grant_type, presented, issued, status, error, fault, tid, realm_id
            )
        )
        if len(log) > self.log_limit:
            # Drop a tenth at once so that trimming costs O(1) per call on average.
            del log[: max(len(log) - self.log_limit, self.log_limit // 10)]
        self._counts[endpoint][f"fault:{fault}" if fault else error or "ok"] += 1

    async def _stamp_tid(self, request: web.Request, response: web.StreamResponse) -> None:
        if "intuit_tid" not in response.headers:
            response.headers["intuit_tid"] = self._new_tid()

    # -- HTTP: control API ---------------------------------------------------

    async def _sim_faults(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        _only(data, {"kind", "count", "endpoint", "retry_after"})
        self.inject(
            _require_str(data, "kind"),
            data.get("count", 1),
            endpoint=data.get("endpoint", "token"),
            retry_after=data.get("retry_after"),
        )
        return web.json_response({"pending_faults": self.stats()["pending_faults"]})

    async def _sim_deny(self, request: web.Request) -> web.Response:
        self.deny_next_authorization()
        return web.json_response({"pending_denials": self._denials})

    async def _sim_grants(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        _only(data, {"realm_id", "count"})
        if "count" in data:
            # Bulk minting for the benchmark: {"count": N} answers {"grants": [...]}.
            count = data["count"]
            if "realm_id" in data:
                raise ValueError("give either realm_id or count, not both")
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError("count must be an integer")
            if not 1 <= count <= MAX_BULK_GRANTS:
                raise ValueError(f"count must be between 1 and {MAX_BULK_GRANTS}")
            return web.json_response({"grants": [self.grant() for _ in range(count)]})
        realm_id = data.get("realm_id")
        if realm_id is not None and (not isinstance(realm_id, str) or not realm_id):
            raise ValueError("realm_id must be a non-empty string")
        return web.json_response(self.grant(realm_id))

    async def _sim_invalidate(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        _only(data, {"refresh_token"})
        self.invalidate(_require_str(data, "refresh_token"))
        return web.json_response({"invalidated": True})

    async def _sim_log(self, request: web.Request) -> web.Response:
        entries = self.request_log
        if "limit" in request.query:
            try:
                limit = int(request.query["limit"])
            except ValueError:
                raise ValueError("limit must be an integer") from None
            entries = entries[-limit:] if limit > 0 else []
        return web.json_response({"entries": [e.to_json() for e in entries]})

    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _sim_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _sim_settings(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            self.settings.update(**await _json_object(request))
        return web.json_response(asdict(self.settings))


def _control(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Turn bad input into 400 and unknown tokens into 404, as JSON."""

    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ValueError as exc:
            return web.json_response({"error": "invalid_request", "detail": str(exc)}, status=400)
        except KeyError as exc:
            detail = exc.args[0] if exc.args else "not found"
            return web.json_response({"error": "not_found", "detail": detail}, status=404)

    return wrapped


async def _json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    return data


def _only(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _require_str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name!r} must be a non-empty string")
    return value


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _retry_after_text(seconds: float | None) -> str:
    """Whole seconds as HTTP wants; a fraction is kept (``0.5``) so tests can stay fast."""
    value = DEFAULT_RETRY_AFTER if seconds is None else seconds
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _nginx_page(status: int, reason: str, headers: dict[str, str]) -> web.Response:
    text = _NGINX_PAGE.format(status=f"{status} {reason}")
    return web.Response(status=status, text=text, content_type="text/html", headers=headers)


def _drop_connection(request: web.Request) -> web.Response:
    """Close the connection without an answer.

    aiohttp then fails to write the returned response, takes it for a client
    that went away, and logs nothing.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=204)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104 - mapping a wildcard to loopback, not binding
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


SIMULATOR_KEY: Final = web.AppKey("simulator", IntuitSimulator)


async def serve_simulator(
    host: str, port: int, settings: SimulatorSettings, stop: asyncio.Event
) -> None:
    """Run a simulator on ``host:port`` until ``stop`` is set; log where it listens."""
    simulator = IntuitSimulator(settings)
    await simulator.start(host, port)
    try:
        structlog.get_logger("qbo_daemon.simulator").info(
            "simulator listening",
            base_url=simulator.base_url,
            authorization_endpoint=simulator.authorization_endpoint,
            token_endpoint=simulator.token_endpoint,
            revocation_endpoint=simulator.revocation_endpoint,
            control_api=f"{simulator.base_url}/_sim/",
            client_id=settings.client_id,
        )
        await stop.wait()
    finally:
        await simulator.close()
