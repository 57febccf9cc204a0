"""An Intuit OAuth 2.0 stand-in: the authorization, token and revocation endpoints.

Beside them, the one Accounting API call the daemon makes (``CompanyInfo``, to
confirm a new connection's company).

It speaks Intuit's wire format as the field notes describe it: Basic client
authentication, form-encoded token requests, ``x_refresh_token_expires_in``
counting down between rotations, the opt-in ``x_refresh_token_hard_expires_in``,
a refresh token that rotates after ``rotate_after`` seconds and whose old value
dies at once, ``invalid_grant`` for every dead token or code, and an
``intuit_tid`` header on every answer. Faults (5xx, nginx HTML pages, 429,
hangs, dropped connections, garbled bodies, or any exact answer: ``raw``) are
injected per endpoint, in process or over the ``/_sim/`` control API. The
tests, ``qbo-daemon demo``, the benchmark and ``qbo-daemon simulator --port N``
all run it.

It is also the witness of the one fault a token refresher must never commit:
a refresh presenting a refresh token that another call still being answered
presented too (``concurrent_use``), or presenting a value it has already
rotated out (``stale_use``: answered ``invalid_grant`` as any unknown token,
but counted apart from never-issued garbage). Both are counted with the token
endpoint's outcomes in :meth:`IntuitSimulator.stats` (``GET /_sim/stats``) and
flagged on the request log's entries (``GET /_sim/log``).

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
remembers only its last 8 access tokens, used authorization codes are
forgotten once expired, and each refresh token value rotated out is remembered
as its hash (about 60 bytes a rotation) to tell a stale use.

This module is the public surface; the parts live beside it:
``settings`` (how it answers), ``grants`` (connections, codes, rotation,
expiry), ``oauth`` (the three OAuth endpoints on the wire), ``company`` (the
CompanyInfo call), ``faults`` (fault kinds and their answers), ``log`` (the
request log and counts) and ``control`` (the ``/_sim/`` API).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import structlog
from aiohttp import web

from qbo_daemon.core.clock import Clock, SystemClock
from qbo_daemon.simulator.company import CompanyEndpoint
from qbo_daemon.simulator.control import MAX_BULK_GRANTS, add_control_routes
from qbo_daemon.simulator.faults import (
    DEFAULT_RETRY_AFTER,
    ENDPOINTS,
    FAULT_KINDS,
    HANG_SECONDS,
    RAW_KIND,
    FaultPlan,
    RawAnswer,
)
from qbo_daemon.simulator.grants import Grants
from qbo_daemon.simulator.log import DEFAULT_LOG_LIMIT, RequestLog, RequestLogEntry
from qbo_daemon.simulator.oauth import OAuthEndpoints
from qbo_daemon.simulator.settings import SimulatorSettings

__all__ = [
    "DEFAULT_LOG_LIMIT",
    "DEFAULT_RETRY_AFTER",
    "ENDPOINTS",
    "FAULT_KINDS",
    "HANG_SECONDS",
    "MAX_BULK_GRANTS",
    "RAW_KIND",
    "SIMULATOR_KEY",
    "IntuitSimulator",
    "RawAnswer",
    "RequestLogEntry",
    "SimulatorSettings",
    "serve_simulator",
]

_SHUTDOWN_TIMEOUT: Final = 2.0


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
        settings = settings if settings is not None else SimulatorSettings()
        self.base_url = ""
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._log = RequestLog(ENDPOINTS, log_limit)
        self._grants = Grants(settings)
        self._faults = FaultPlan()
        self._oauth = OAuthEndpoints(
            settings, self._clock, self._grants, self._faults, self._log, self._is_closing
        )
        self._company = CompanyEndpoint(
            self._clock, self._grants, self._faults, self._log, self._oauth
        )
        self._runner: web.AppRunner | None = None
        self._closing = False

    # -- state ---------------------------------------------------------------

    @property
    def settings(self) -> SimulatorSettings:
        """How the simulator answers; change it at run time (prefer ``update``)."""
        return self._grants.settings

    @settings.setter
    def settings(self, settings: SimulatorSettings) -> None:
        self._grants.settings = settings
        self._oauth.settings = settings

    @property
    def request_log(self) -> list[RequestLogEntry]:
        """The last ``log_limit`` calls, oldest first."""
        return self._log.entries

    @request_log.setter
    def request_log(self, entries: list[RequestLogEntry]) -> None:
        self._log.entries = entries

    @property
    def log_limit(self) -> int:
        return self._log.limit

    @log_limit.setter
    def log_limit(self, limit: int) -> None:
        self._log.limit = limit

    @property
    def pending_denials(self) -> int:
        """How many authorizations are still to be declined."""
        return self._faults.denials

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

    @property
    def api_base(self) -> str:
        """The Accounting API's base: ``{api_base}/v3/company/{realm}/companyinfo/{realm}``."""
        return self.base_url

    def company_info_url(self, realm_id: str) -> str:
        return f"{self.api_base}/v3/company/{realm_id}/companyinfo/{realm_id}"

    # -- lifecycle -----------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app[SIMULATOR_KEY] = self
        self._oauth.add_routes(app)
        self._company.add_routes(app)
        add_control_routes(app, self)
        app.on_response_prepare.append(self._oauth.stamp_tid)
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

    def _is_closing(self) -> bool:
        return self._closing

    # -- in-process control --------------------------------------------------

    def inject(
        self,
        kind: str,
        count: int = 1,
        *,
        endpoint: str = "token",
        retry_after: float | None = None,
        raw: RawAnswer | None = None,
    ) -> None:
        """Answer the next ``count`` calls of ``endpoint`` with fault ``kind``.

        Kind ``raw`` answers with exactly ``raw`` (see :class:`RawAnswer`).
        """
        self._faults.inject(kind, count, endpoint, retry_after, raw)

    def deny_next_authorization(self) -> None:
        """The next authorization is declined by the user (``error=access_denied``)."""
        self._faults.deny_next()

    def choose_realm(self, realm_id: str) -> None:
        """The next user to consent picks this company (say, one already connected)."""
        if not realm_id:
            raise ValueError("realm_id must be a non-empty string")
        self._grants.choose_realm(realm_id)

    def grant(self, realm_id: str | None = None) -> dict[str, Any]:
        """Mint a connection without a browser: its token answer plus ``realm_id``.

        The answer always carries ``x_refresh_token_hard_expires_in`` (unless
        ``hard_expires_in`` is None): there is no request header to opt in with.
        """
        return self._grants.grant(realm_id, self._clock.now().timestamp())

    def invalidate(self, refresh_token: str) -> None:
        """The user disconnected the app inside QuickBooks: the connection's tokens die.

        Accepts a connection's current refresh token (or one of its recent
        access tokens); a rotated-out or unknown value raises ``KeyError``.
        """
        self._grants.invalidate(refresh_token)

    def is_access_token_valid(self, access_token: str) -> bool:
        """Whether a QuickBooks API call with this bearer token would be accepted."""
        return self._grants.is_access_token_valid(access_token, self._clock.now().timestamp())

    def stats(self) -> dict[str, Any]:
        """Calls per endpoint and outcome (``ok``, an error code, ``fault:<kind>``,
        ``rotated``, and the token endpoint's ``concurrent_use`` and ``stale_use``;
        an outcome never seen is absent), plus connections and pending faults."""
        return {
            **{endpoint: dict(counts) for endpoint, counts in self._log.counts.items()},
            "connections": self._grants.connection_counts(),
            "pending_faults": self._faults.pending(),
            "pending_denials": self._faults.denials,
            "log_entries": len(self._log.entries),
        }

    def reset(self) -> None:
        """Forget pending faults and denials, the log and the counts; keep the grants."""
        self._faults.clear()
        self._log.clear()


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
        structlog.get_logger("qbo_daemon.simulator.app").info(
            "simulator listening",
            base_url=simulator.base_url,
            authorization_endpoint=simulator.authorization_endpoint,
            token_endpoint=simulator.token_endpoint,
            revocation_endpoint=simulator.revocation_endpoint,
            api_base=simulator.api_base,
            control_api=f"{simulator.base_url}/_sim/",
            client_id=settings.client_id,
        )
        await stop.wait()
    finally:
        await simulator.close()
