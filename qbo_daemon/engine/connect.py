"""The OAuth connect flow: authorization URLs with single-use states, and the callback.

A state is random (``secrets``), single use, expires after ``state_ttl`` and is
bound to the account that asked for it. It lives in SQLite as a SHA-256 hash
(``store.states``), so a restart between the authorization URL and the
callback does not break the flow, and a reader of the database cannot use it.
With ``[intuit] pkce`` the state's row also keeps a PKCE verifier (encrypted)
whose S256 challenge rides on the authorization URL.

Authorization codes are single use and exchanging one twice can kill the
connection (oauth-jsclient 173), and browsers do fire a callback twice. The
first request claims the state and exchanges the code; a second request for
the same state with the same code waits for the first, or reads its recorded
outcome, and shows it, without a second exchange. Any other use of a used
state gets a 400.

The callback's ``realmId`` comes from the browser, so after the exchange the
company is confirmed with Intuit (``engine.realm_check``): refused, nothing
is stored and the new tokens are revoked; not answered, the connection is
stored as unverified and checked again after its next refresh. Then
``store.realms`` applies two rules in the transaction that stores it: a
company another account id holds is refused (unless ``[callback]
allow_shared_realm``), and an account is moved to another company only when
its authorize-url request asked (``allow_realm_change``), which emits
``account.realm_changed``. Every refusal is a 400 page that names the
problem, and writes nothing but the state's outcome.
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
    RealmConflictError,
    StorageError,
)
from qbo_daemon.core.metrics import Metrics
from qbo_daemon.core.models import ACCOUNT_ID_RULE, valid_account_id
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.engine.realm_check import RealmCheck
from qbo_daemon.engine.scheduler import Events, Scheduler
from qbo_daemon.intuit import pkce
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.intuit.company import RealmVerdict
from qbo_daemon.store.port import AccountStore, RealmPolicy
from qbo_daemon.store.states import answer_hash

log = structlog.get_logger("qbo_daemon.engine.connect")

_STATE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_REALM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_CODE = 4096


@dataclass(frozen=True, slots=True)
class ConnectResult:
    """What the callback page tells the user (never a token or code)."""

    # connected | denied | invalid_request | invalid_state | exchange_failed | error
    # | realm_refused | realm_shared | realm_changed
    outcome: str
    http_status: int
    title: str
    message: str
    account_id: str | None = None


# What the browser is told when a connection is refused for its company.
_REFUSALS = {
    "realm_refused": "Intuit did not confirm the QuickBooks company this sign-in named, so "
    "nothing was connected. Start connecting again from the app.",
    "realm_shared": "This QuickBooks company is already connected to another account in "
    "the app, so it was not connected here. Ask the app's operator if it should be shared.",
    "realm_changed": "This account is already connected to a different QuickBooks company, "
    "so nothing was changed. To switch companies, start again from the app and choose to "
    "change the company.",
}


class ConnectFlow:
    def __init__(
        self,
        storage: AccountStore,
        intuit: IntuitClient,
        scheduler: Scheduler,
        clock: Clock,
        metrics: Metrics,
        events: Events,
        realm_check: RealmCheck,
        policy: RefreshPolicy,
        *,
        state_ttl: timedelta = timedelta(minutes=10),
        allow_shared_realm: bool = False,
    ) -> None:
        self._storage = storage
        self._intuit = intuit
        self._scheduler = scheduler
        self._clock = clock
        self._metrics = metrics
        self._events = events
        self._realm_check = realm_check
        self._policy = policy
        self._state_ttl = state_ttl
        self.allow_shared_realm = allow_shared_realm  # a reload may change it
        # In-flight callbacks per state: the hash of their answer, and their outcome.
        self._pending: dict[str, tuple[str, asyncio.Future[ConnectResult]]] = {}

    async def authorize_url(self, account_id: str, *, allow_realm_change: bool = False) -> str:
        """A fresh Intuit authorization URL whose state is bound to ``account_id``.

        ``allow_realm_change`` lets this authorization move the account to
        another company. With ``[intuit] pkce`` the URL carries an S256 challenge.
        """
        if not valid_account_id(account_id):
            raise ValueError(f"account_id must be {ACCOUNT_ID_RULE}")
        state = secrets.token_urlsafe(32)
        verifier = pkce.new_verifier() if self._intuit.config.pkce else None
        dropped = await self._storage.create_state(
            state,
            account_id,
            now=self._clock.now(),
            ttl=self._state_ttl,
            code_verifier=verifier,
            allow_realm_change=allow_realm_change,
        )
        if dropped:
            log.info(
                "connect.states_dropped",
                account_id=account_id,
                dropped=dropped,
                detail="the oldest pending sign-in links of this account no longer work",
            )
        log.info(
            "connect.started",
            account_id=account_id,
            pkce=verifier is not None,
            allow_realm_change=allow_realm_change,
        )
        challenge = pkce.challenge(verifier) if verifier is not None else None
        return self._intuit.authorization_url(state, code_challenge=challenge)

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
        error = query.get("error")
        code = query.get("code", "")
        realm_id = query.get("realmId", "")
        answer = answer_hash(code, error)
        pending = self._pending.get(state)
        if pending is not None:
            if pending[0] == answer:
                # The same callback fired twice: show the first one's outcome.
                return await asyncio.shield(pending[1])
            return self._done(_used())
        if error is None:
            problem = _check_code_and_realm(code, realm_id)
            if problem is not None:
                return self._done(ConnectResult("invalid_request", 400, "Cannot connect", problem))
        future: asyncio.Future[ConnectResult] = asyncio.get_running_loop().create_future()
        self._pending[state] = (answer, future)
        try:
            result = await self._claim_and_finish(state, answer, error, code, realm_id)
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
        self, state: str, answer: str, error: str | None, code: str, realm_id: str
    ) -> ConnectResult:
        try:
            claim = await self._storage.consume_state(state, answer, now=self._clock.now())
        except OAuthStateError as exc:
            if exc.reason == "replayed":
                return await self._earlier_outcome(state)
            if exc.reason == "used":
                # Used already, and now with another code or answer: a replay, refused.
                log.warning("connect.state_replayed", reason="used", first_outcome=None)
                return _used()
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
        account_id = claim.account_id
        if error is not None:
            await self._storage.finish_state(state, "denied")
            log.info("connect.denied", account_id=account_id, error=error[:64])
            return _denied(account_id)
        try:
            # The client's own lines (a garbled field in Intuit's answer) name the account too.
            with structlog.contextvars.bound_contextvars(account_id=account_id):
                result = await self._intuit.exchange_code(code, code_verifier=claim.code_verifier)
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
        tokens = result.tokens
        check = await self._realm_check.confirm(
            tokens.access_token, realm_id, account_id=account_id
        )
        if check.verdict is RealmVerdict.REFUSED:
            # A forged or mistaken realmId: keep nothing, and end the tokens we got.
            await self._storage.finish_state(state, "realm_refused")
            log.error(
                "connect.realm_refused",
                account_id=account_id,
                detail=check.detail,
                intuit_tid=check.intuit_tid,
            )
            await self._realm_check.revoke(tokens.refresh_token, account_id=account_id)
            return _refused("realm_refused", account_id)
        verified = check.verdict is RealmVerdict.CONFIRMED
        policy = RealmPolicy(
            allow_shared=self.allow_shared_realm, allow_change=claim.allow_realm_change
        )
        try:
            connected = self._policy.connected(
                account_id, realm_id, tokens, now=self._clock.now(), realm_verified=verified
            )
            account, previous_realm = await self._storage.upsert_checked_connection(
                connected, policy
            )
        except RealmConflictError as exc:
            # Not revoked: at Intuit the grant may be the same one another account uses.
            outcome = f"realm_{exc.reason}"
            await self._storage.finish_state(state, outcome)
            log.warning(
                "connect.realm_disallowed",
                account_id=account_id,
                reason=exc.reason,
                held_by=exc.holder,
                detail=str(exc),
            )
            return _refused(outcome, account_id)
        # The connection is saved: time it before anything else can fail.
        self._scheduler.schedule_account(account)
        self._events.emit(
            "account.connected",
            account_id,
            intuit_tid=result.intuit_tid,
            realm_verified=verified,
        )
        if previous_realm is not None:
            self._events.emit(
                "account.realm_changed",
                account_id,
                realm_id=realm_id,
                previous_realm_id=previous_realm,
            )
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

    async def _earlier_outcome(self, state: str) -> ConnectResult:
        """The page the first callback of this state and this answer showed."""
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
        if record is not None and record.outcome in _REFUSALS:
            return _refused(record.outcome, record.account_id)
        return _used()

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


def _used() -> ConnectResult:
    return ConnectResult(
        "invalid_state",
        400,
        "This sign-in link cannot be used",
        "This sign-in link has already been used. Start connecting again from the app.",
    )


def _refused(outcome: str, account_id: str) -> ConnectResult:
    return ConnectResult(
        outcome, 400, "QuickBooks was not connected", _REFUSALS[outcome], account_id
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
