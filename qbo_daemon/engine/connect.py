"""The OAuth connect flow: authorization URLs with single-use states, and the callback.

A state is random (``secrets``), single use, expires after ``state_ttl`` and is
bound to the account that asked for it. It lives in SQLite, so a restart
between the authorization URL and the callback does not break the flow.

Authorization codes are single use and exchanging one twice can kill the
connection (oauth-jsclient 173), and browsers do fire a callback twice. The
first request claims the state and exchanges the code; a second request for
the same state waits for the first and shows its outcome, without a second
exchange.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import (
    IntuitError,
    InvalidClientError,
    InvalidGrantError,
    OAuthStateError,
    StorageError,
)
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import ACCOUNT_ID_RULE, valid_account_id
from qbo_daemon.engine.scheduler import Events, Scheduler
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.store.repository import Storage

log = structlog.get_logger("qbo_daemon.engine.connect")

_STATE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_REALM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_CODE = 4096


@dataclass(frozen=True, slots=True)
class ConnectResult:
    """What the callback page tells the user (never a token or code)."""

    outcome: str  # connected | denied | invalid_request | invalid_state | exchange_failed | error
    http_status: int
    title: str
    message: str
    account_id: str | None = None


class ConnectFlow:
    def __init__(
        self,
        storage: Storage,
        intuit: IntuitClient,
        scheduler: Scheduler,
        clock: Clock,
        metrics: Metrics,
        events: Events,
        *,
        lead: timedelta,
        state_ttl: timedelta = timedelta(minutes=10),
    ) -> None:
        self._storage = storage
        self._intuit = intuit
        self._scheduler = scheduler
        self._clock = clock
        self._metrics = metrics
        self._events = events
        self.lead = lead
        self._state_ttl = state_ttl
        self._pending: dict[str, asyncio.Future[ConnectResult]] = {}

    async def authorize_url(self, account_id: str) -> str:
        """A fresh Intuit authorization URL whose state is bound to ``account_id``."""
        if not valid_account_id(account_id):
            raise ValueError(f"account_id must be {ACCOUNT_ID_RULE}")
        state = secrets.token_urlsafe(32)
        await self._storage.create_state(
            state, account_id, now=self._clock.now(), ttl=self._state_ttl
        )
        log.info("connect.started", account_id=account_id)
        return self._intuit.authorization_url(state)

    async def complete(self, query: Mapping[str, str]) -> ConnectResult:
        """Handle Intuit's redirect back to us. Bad input changes nothing."""
        state = query.get("state", "")
        if not _STATE_PATTERN.fullmatch(state):
            # Never a state we issued (ours are 43 url-safe characters): made up or mangled.
            log.warning("connect.state_forged", reason="malformed", length=len(state))
            return self._done(
                ConnectResult(
                    "invalid_state",
                    400,
                    "This sign-in link is not valid",
                    "The request has no valid state. Start connecting QuickBooks again "
                    "from the app.",
                )
            )
        pending = self._pending.get(state)
        if pending is not None:
            # The same callback fired twice: show the first one's outcome.
            return await asyncio.shield(pending)
        error = query.get("error")
        code = query.get("code", "")
        realm_id = query.get("realmId", "")
        if error is None:
            problem = _check_code_and_realm(code, realm_id)
            if problem is not None:
                return self._done(ConnectResult("invalid_request", 400, "Cannot connect", problem))
        future: asyncio.Future[ConnectResult] = asyncio.get_running_loop().create_future()
        self._pending[state] = future
        try:
            result = await self._claim_and_finish(state, error, code, realm_id)
        except Exception as exc:  # a boundary: the browser gets a page, the log the cause
            log.exception("connect.failed", error=str(exc))
            result = ConnectResult(
                "error", 500, "Something went wrong", "The connection was not saved. Try again."
            )
        finally:
            del self._pending[state]
        future.set_result(result)
        return self._done(result)

    async def _claim_and_finish(
        self, state: str, error: str | None, code: str, realm_id: str
    ) -> ConnectResult:
        try:
            account_id = await self._storage.consume_state(state, now=self._clock.now())
        except OAuthStateError as exc:
            if exc.reason == "used":
                return await self._earlier_outcome(state, exc)
            if exc.reason == "unknown":
                # Not issued here (or purged a day after it expired): forged, or another daemon's.
                log.warning("connect.state_forged", reason="unknown")
            else:
                try:
                    record = await self._storage.get_state(state)
                except StorageError:
                    record = None
                log.info("connect.state_expired", account_id=record.account_id if record else None)
            return ConnectResult("invalid_state", 400, "This sign-in link cannot be used", str(exc))
        if error is not None:
            await self._storage.finish_state(state, "denied")
            log.info("connect.denied", account_id=account_id, error=error[:64])
            return _denied(account_id)
        try:
            # The client's own lines (a garbled field in Intuit's answer) name the account too.
            with structlog.contextvars.bound_contextvars(account_id=account_id):
                result = await self._intuit.exchange_code(code)
        except IntuitError as exc:
            await self._storage.finish_state(state, "exchange_failed")
            log.error(
                "connect.exchange_failed",
                account_id=account_id,
                error=str(exc),
                intuit_tid=exc.intuit_tid,
            )
            if isinstance(exc, InvalidGrantError):
                message = "Intuit refused the sign-in code. Start connecting again."
                return ConnectResult("exchange_failed", 400, "Cannot connect", message, account_id)
            if isinstance(exc, InvalidClientError):
                message = "The app's QuickBooks credentials are misconfigured. Tell its operator."
            else:
                message = "Intuit could not be reached. Start connecting again in a few minutes."
            return ConnectResult("exchange_failed", 502, "Cannot connect", message, account_id)
        account = await self._storage.save_connection(
            account_id, realm_id, result.tokens, lead=self.lead, now=self._clock.now()
        )
        # The connection is saved: time it before anything else can fail.
        self._scheduler.schedule_account(account)
        self._events.emit("account.connected", account_id, intuit_tid=result.intuit_tid)
        try:
            await self._storage.finish_state(state, "connected")
        except StorageError as exc:
            # Only a replayed callback would miss this note; the connection stands.
            log.warning("connect.state_note_failed", account_id=account_id, error=str(exc))
        return ConnectResult(
            "connected",
            200,
            "QuickBooks is connected",
            "You can close this window and return to the app.",
            account_id,
        )

    async def _earlier_outcome(self, state: str, exc: OAuthStateError) -> ConnectResult:
        try:
            record = await self._storage.get_state(state)
        except StorageError:
            record = None
        # A state is single use: a second callback with it is a reload of the page at
        # best, a replayed authorization code at worst. Either way no second exchange.
        log.warning(
            "connect.state_replayed",
            account_id=record.account_id if record is not None else None,
            first_outcome=record.outcome if record is not None else None,
        )
        if record is not None and record.outcome == "connected":
            return ConnectResult(
                "connected",
                200,
                "QuickBooks is connected",
                "You can close this window and return to the app.",
                record.account_id,
            )
        if record is not None and record.outcome == "denied":
            return _denied(record.account_id)
        return ConnectResult("invalid_state", 400, "This sign-in link cannot be used", str(exc))

    def _done(self, result: ConnectResult) -> ConnectResult:
        self._metrics.callback_outcome(result.outcome)
        return result


def _denied(account_id: str) -> ConnectResult:
    return ConnectResult(
        "denied",
        400,
        "QuickBooks was not connected",
        "Access was not granted, so nothing was connected. You can start again "
        "from the app at any time.",
        account_id,
    )


def _check_code_and_realm(code: str, realm_id: str) -> str | None:
    if not code:
        return "Intuit's answer has no authorization code. Start connecting again."
    if len(code) > _MAX_CODE or not code.isprintable():
        return "Intuit's answer has an authorization code that is not valid."
    if not realm_id:
        return "Intuit's answer has no company id (realmId). Start connecting again."
    if not _REALM_PATTERN.fullmatch(realm_id):
        return "Intuit's answer has a company id (realmId) that is not valid."
    return None
