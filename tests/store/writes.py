"""Writes as the engine decides them, for tests of the store: the policy, then the port.

The storage port computes nothing (``store/port.py``): a test that wants a row
refreshed, failed, connected or imported asks the engine's policy for the row
and hands it to the port, as the engine does. ``LEAD`` is the policy's lead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from qbo_daemon.config.load import default_config
from qbo_daemon.core.models import Account, AccountStatus, ImportItem, TokenSet
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.store.port import AccountStore, AccountWrite, Attempt, Imported, RealmPolicy

LEAD = timedelta(minutes=10)
POLICY = RefreshPolicy(replace(default_config({}).refresh, lead=LEAD))


async def save_connection(
    storage: AccountStore, account_id: str, realm_id: str, token_set: TokenSet, *, now: datetime
) -> Account:
    return await storage.upsert_connection(
        POLICY.connected(account_id, realm_id, token_set, now=now)
    )


async def save_refresh(
    storage: AccountStore,
    account: Account,
    token_set: TokenSet,
    *,
    now: datetime,
    attempt: Attempt | None = None,
) -> Account:
    refreshed = POLICY.refreshed(account, token_set, now=now)
    return await storage.commit(AccountWrite(refreshed, account.version, True, attempt))


async def record_failure(
    storage: AccountStore,
    account: Account,
    *,
    status: AccountStatus,
    error: str,
    now: datetime,
    attempt: Attempt | None = None,
) -> Account:
    noted = replace(
        account,
        status=status,
        failure_count=account.failure_count + 1,
        last_error=error,
        last_failure_at=now,
        updated_at=now,
    )
    return await storage.commit(AccountWrite(noted, account.version, False, attempt))


async def forget_tokens(storage: AccountStore, account: Account, *, now: datetime) -> Account:
    gone = POLICY.disconnected(account, now=now)
    return await storage.commit(AccountWrite(gone, account.version, True))


async def import_accounts(
    storage: AccountStore,
    items: Sequence[ImportItem],
    *,
    now: datetime,
    replace_existing: bool = True,
) -> list[Imported]:
    return await storage.import_connections(
        [POLICY.imported(i, now=now) for i in items], replace_existing=replace_existing
    )


async def save_checked_connection(
    storage: AccountStore,
    account_id: str,
    realm_id: str,
    token_set: TokenSet,
    *,
    now: datetime,
    policy: RealmPolicy,
    realm_verified: bool = True,
) -> tuple[Account, str | None]:
    connected = POLICY.connected(
        account_id, realm_id, token_set, now=now, realm_verified=realm_verified
    )
    return await storage.upsert_checked_connection(connected, policy)
