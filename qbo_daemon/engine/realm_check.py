"""Confirming an account's QuickBooks company with Intuit: at connect time, and after refreshes.

The callback's ``realmId`` comes from the browser. :meth:`RealmCheck.confirm`
asks Intuit's CompanyInfo whether the new access token belongs to it
(:mod:`qbo_daemon.intuit.company`). The connect flow refuses a refused realm
and stores an unknown one as unverified (``realm_verified`` false).

An unverified account is checked again after each successful refresh
(:meth:`RealmCheck.after_refresh`, called by the refresher once the new tokens
are committed). Confirmed, the account is marked verified. Unknown, it stays
unverified until the next refresh. Refused, the stored realm is not the
tokens' company: the account is marked ``needs_reconnect`` with a
``last_error`` that says so, its refresh token is revoked at Intuit (best
effort: the tokens are of a company the app does not know), and the
refresher reports it to the scheduler as a grant that cannot be used, which
drops the timer and emits ``account.reconnect_needed``.

Its log lines name the account, not the realm.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from qbo_daemon.core.clock import Clock
from qbo_daemon.core.errors import IntuitError, StorageError
from qbo_daemon.core.models import Account
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.intuit.client import IntuitClient
from qbo_daemon.intuit.company import CompanyInfoClient, RealmCheckResult, RealmVerdict
from qbo_daemon.store.port import AccountStore, AccountWrite, Attempt

log = structlog.get_logger("qbo_daemon.engine.realm_check")


@dataclass(frozen=True, slots=True)
class Recheck:
    """The account after a re-check; ``refused`` is its ``last_error`` when Intuit refused."""

    account: Account
    refused: str | None = None


class RealmCheck:
    def __init__(
        self,
        storage: AccountStore,
        company: CompanyInfoClient,
        intuit: IntuitClient,
        clock: Clock,
        policy: RefreshPolicy,
    ) -> None:
        self._storage = storage
        self._policy = policy
        self._company = company
        self._intuit = intuit
        self._clock = clock

    async def confirm(
        self, access_token: str, realm_id: str, *, account_id: str
    ) -> RealmCheckResult:
        """Whether Intuit says ``access_token`` belongs to ``realm_id``; logged."""
        result = await self._company.check(access_token, realm_id)
        fields = {
            "account_id": account_id,
            "verdict": result.verdict.value,
            "status": result.status,
            "intuit_tid": result.intuit_tid,
        }
        if result.verdict is RealmVerdict.CONFIRMED:
            log.info("realm.confirmed", **fields)
        else:
            log.warning("realm.not_confirmed", detail=result.detail, **fields)
        return result

    async def revoke(self, refresh_token: str, *, account_id: str) -> None:
        """Revoke tokens we will not keep; best effort, the outcome is logged."""
        try:
            tid = await self._intuit.revoke(refresh_token)
        except IntuitError as exc:
            log.warning(
                "realm.revoke_failed",
                account_id=account_id,
                error=str(exc),
                intuit_tid=exc.intuit_tid,
            )
        else:
            log.info("realm.revoked", account_id=account_id, intuit_tid=tid)

    async def after_refresh(self, account: Account) -> Recheck:
        """Check an unverified account with its freshly committed tokens (see the module)."""
        if account.realm_verified or account.access_token is None or account.realm_id is None:
            return Recheck(account)
        result = await self.confirm(
            account.access_token, account.realm_id, account_id=account.account_id
        )
        now = self._clock.now()
        if result.verdict is RealmVerdict.UNKNOWN:
            log.warning(
                "realm.verification_deferred",
                account_id=account.account_id,
                detail="checked again after the next refresh",
            )
            return Recheck(account)
        if result.verdict is RealmVerdict.CONFIRMED:
            try:
                verified = self._policy.realm_verified(account, now=now)
                return Recheck(
                    await self._storage.commit(
                        AccountWrite(verified, account.version, tokens=False)
                    )
                )
            except StorageError as exc:  # a stale write included: the next refresh checks again
                log.warning(
                    "realm.verified_not_noted", account_id=account.account_id, error=str(exc)
                )
                return Recheck(account)
        message = (
            f"Intuit did not confirm that this connection's tokens belong to its company "
            f"({result.detail}); the tokens were revoked and the user must reconnect"
        )
        attempt = Attempt(
            account_id=account.account_id,
            started_at=now,
            outcome="realm_refused",
            duration_ms=0.0,
            intuit_tid=result.intuit_tid,
            error=message,
        )
        try:
            refused = self._policy.realm_refused(account, message, now=now)
            updated = await self._storage.commit(
                AccountWrite(refused, account.version, tokens=False, attempt=attempt)
            )
        except StorageError as exc:  # a stale write included: the next refresh checks again
            log.warning("realm.refusal_not_noted", account_id=account.account_id, error=str(exc))
            return Recheck(account)
        if account.refresh_token is not None:
            await self.revoke(account.refresh_token, account_id=account.account_id)
        return Recheck(updated, refused=message)
