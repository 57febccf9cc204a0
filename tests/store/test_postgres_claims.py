"""Claims, fencing, heartbeats and notifications: what several daemons on PostgreSQL share.

Two :class:`PostgresStorage` objects on one fresh database stand for two
daemons; what is checked is what a node would act on (the claim granted or
refused, the row written or not) and what an operator would see in the
``accounts`` and ``nodes`` tables.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import asyncpg
import pytest
import structlog

from qbo_daemon.core.errors import ConfigError, StaleWriteError
from qbo_daemon.core.models import Account
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import AccountChange, AccountWrite, Busy, Claimed, NotDue
from qbo_daemon.store.postgres.storage import PostgresStorage
from tests.store.test_repository import NOW, REALM, tokens
from tests.store.writes import POLICY, save_connection

LEASE = 30.0


@pytest.fixture
async def pair(
    pg_url: str, cipher: Cipher
) -> AsyncIterator[tuple[PostgresStorage, PostgresStorage]]:
    first = await PostgresStorage.open(pg_url, cipher, node_id="node-a")
    second = await PostgresStorage.open(pg_url, cipher, node_id="node-b")
    yield first, second
    await first.close()
    await second.close()


async def lease_columns(url: str, account_id: str = "acct-1") -> asyncpg.Record:
    conn = await asyncpg.connect(url)
    try:
        record = await conn.fetchrow(
            "SELECT lease_owner, lease_until, lease_generation, inflight_since, version "
            "FROM accounts WHERE account_id = $1",
            account_id,
        )
        assert record is not None
        return record
    finally:
        await conn.close()


async def expire_lease(url: str, account_id: str = "acct-1") -> None:
    """The lease's time runs out, as if its node were paused past it."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE accounts SET lease_until = clock_timestamp() - interval '1 second' "
            "WHERE account_id = $1",
            account_id,
        )
    finally:
        await conn.close()


async def connected(storage: PostgresStorage) -> Account:
    return await save_connection(storage, "acct-1", REALM, tokens(), now=NOW)


def refreshed_write(account: Account, claimed: Claimed, access: str, refresh: str) -> AccountWrite:
    row = POLICY.refreshed(account, tokens(access, refresh), now=NOW + timedelta(minutes=50))
    return AccountWrite(row, account.version, tokens=True, claim=claimed.claim)


async def test_one_node_claims_and_the_other_is_told_who_holds_it_and_for_how_long(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    await connected(a)
    granted = await a.claim("acct-1", lease=LEASE)
    assert isinstance(granted, Claimed)
    assert granted.account.refresh_token == tokens().refresh_token
    assert granted.claim.owner.startswith("node-a#")  # the node, and this process
    assert granted.claim.abandoned_since is None
    refused = await b.claim("acct-1", lease=LEASE)
    assert isinstance(refused, Busy)
    assert refused.owner == granted.claim.owner
    assert LEASE - 5 < refused.remaining <= LEASE
    row = await lease_columns(pg_url)
    assert row["lease_owner"] == granted.claim.owner
    assert row["lease_generation"] == granted.claim.generation
    assert row["inflight_since"] is not None
    assert await a.claim("nobody", lease=LEASE) is None


async def test_the_claims_commit_ends_it_and_the_next_claim_takes_a_new_generation(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    account = await connected(a)
    granted = await a.claim("acct-1", lease=LEASE)
    assert isinstance(granted, Claimed)
    stored = await a.commit(refreshed_write(account, granted, "A2", "R2"))
    row = await lease_columns(pg_url)
    assert (row["lease_owner"], row["lease_until"], row["inflight_since"]) == (None, None, None)
    again = await b.claim("acct-1", lease=LEASE)
    assert isinstance(again, Claimed)
    assert again.claim.generation == granted.claim.generation + 1
    assert again.account.refresh_token == "R2"
    assert again.account.version == stored.version


async def test_a_timers_claim_of_a_row_refreshed_meanwhile_is_not_due(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    account = await connected(a)
    assert account.reconnect_token_at is not None
    late = await b.claim("acct-1", lease=LEASE, due_by=account.reconnect_token_at - timedelta(1))
    assert isinstance(late, NotDue)
    assert (await lease_columns(pg_url))["lease_owner"] is None
    due = await b.claim("acct-1", lease=LEASE, due_by=account.reconnect_token_at)
    assert isinstance(due, Claimed)


async def test_a_node_paused_past_its_lease_stores_its_answer_if_the_row_is_as_it_read_it(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    account = await connected(a)
    paused = await a.claim("acct-1", lease=LEASE)
    assert isinstance(paused, Claimed)
    await expire_lease(pg_url)
    taken = await b.claim("acct-1", lease=LEASE)
    assert isinstance(taken, Claimed)
    # The call a paused node made and never answered: it may have rotated the token.
    assert taken.claim.abandoned_since is not None
    assert taken.claim.abandoned_for is not None
    assert taken.claim.abandoned_for >= 0

    with structlog.testing.capture_logs() as logs:
        stored = await a.commit(refreshed_write(account, paused, "A-late", "R-late"))
    assert stored.refresh_token == "R-late"
    assert [e["event"] for e in logs] == ["claim.lost"]
    row = await lease_columns(pg_url)
    # The later claim is left alone: its node is still mid-call...
    assert row["lease_owner"] == taken.claim.owner
    assert row["lease_generation"] == taken.claim.generation
    # ...and its answer, from the same row, is superseded: nothing it writes lands.
    with pytest.raises(StaleWriteError):
        await b.commit(refreshed_write(taken.account, taken, "A-b", "R-b"))
    assert (await a.load("acct-1")).refresh_token == "R-late"


async def test_a_release_makes_no_write_and_keeps_the_mark_of_an_abandoned_call(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    account = await connected(a)
    first = await a.claim("acct-1", lease=LEASE)
    assert isinstance(first, Claimed)
    await a.release(first.claim)
    row = await lease_columns(pg_url)
    assert (row["lease_owner"], row["inflight_since"], row["version"]) == (
        None,
        None,
        account.version,
    )
    abandoned = await a.claim("acct-1", lease=LEASE)
    assert isinstance(abandoned, Claimed)
    await expire_lease(pg_url)
    taken = await b.claim("acct-1", lease=LEASE)
    assert isinstance(taken, Claimed)
    assert taken.claim.abandoned_since is not None
    await b.release(taken.claim)
    assert (await lease_columns(pg_url))["inflight_since"] == taken.claim.abandoned_since
    # A stale release (an old generation) changes nothing.
    await a.release(abandoned.claim)
    assert (await lease_columns(pg_url))["inflight_since"] == taken.claim.abandoned_since


async def test_a_failure_note_may_keep_the_mark_and_new_tokens_always_end_it(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    account = await connected(a)
    await a.claim("acct-1", lease=LEASE)
    await expire_lease(pg_url)
    taken = await b.claim("acct-1", lease=LEASE)
    assert isinstance(taken, Claimed)
    note = replace(account, failure_count=1, last_error="invalid_grant (after a takeover)")
    noted = await b.commit(
        AccountWrite(note, account.version, tokens=False, claim=taken.claim, keep_abandoned=True)
    )
    row = await lease_columns(pg_url)
    assert row["lease_owner"] is None
    assert row["inflight_since"] is not None
    again = await b.claim("acct-1", lease=LEASE)
    assert isinstance(again, Claimed)
    assert again.claim.abandoned_since is not None
    await b.commit(refreshed_write(noted, again, "A3", "R3"))
    assert (await lease_columns(pg_url))["inflight_since"] is None


async def test_a_reconnect_ends_any_claim_on_the_old_credentials(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    await connected(a)
    held = await a.claim("acct-1", lease=LEASE)
    assert isinstance(held, Claimed)
    await save_connection(b, "acct-1", REALM, tokens("A-new", "R-new"), now=NOW)
    row = await lease_columns(pg_url)
    assert (row["lease_owner"], row["inflight_since"]) == (None, None)
    assert isinstance(await b.claim("acct-1", lease=LEASE), Claimed)


async def test_heartbeats_list_every_node_and_a_node_that_leaves_is_gone(
    pair: tuple[PostgresStorage, PostgresStorage],
) -> None:
    a, b = pair
    await a.heartbeat()
    nodes = await b.heartbeat()
    assert [n.node_id for n in nodes] == ["node-a", "node-b"]
    assert all(0 <= n.age < 5 for n in nodes)
    await a.leave()
    assert [n.node_id for n in await b.heartbeat()] == ["node-b"]


async def test_every_change_is_heard_with_its_schedule_and_a_cut_listener_comes_back(
    pair: tuple[PostgresStorage, PostgresStorage], pg_url: str
) -> None:
    a, b = pair
    heard: list[AccountChange | None] = []
    await b.listen(heard.append)
    account = await connected(a)
    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.02)
    [change] = heard
    assert change is not None
    assert (change.account_id, change.version, change.origin) == ("acct-1", 1, "node-a")
    assert change.reconnect_token_at == account.reconnect_token_at
    assert change.status is account.status
    assert change.failure_count == 0
    heard.clear()

    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND query LIKE 'LISTEN%'"
        )
    finally:
        await admin.close()
    for _ in range(100):
        await b.heartbeat()  # brings the listener back, and says changes were missed
        if heard:
            break
        await asyncio.sleep(0.05)
    assert heard == [None]
    await save_connection(a, "acct-2", REALM, tokens(), now=NOW)
    for _ in range(100):
        if len(heard) > 1:
            break
        await asyncio.sleep(0.02)
    assert [c.account_id for c in heard[1:] if c is not None] == ["acct-2"]


async def test_two_processes_given_one_node_id_never_hold_one_claim_and_the_second_is_refused(
    pg_url: str, cipher: Cipher
) -> None:
    first = await PostgresStorage.open(pg_url, cipher, node_id="web-1")
    copy = await PostgresStorage.open(pg_url, cipher, node_id="web-1")  # a copied config
    try:
        await connected(first)
        held = await first.claim("acct-1", lease=LEASE)
        assert isinstance(held, Claimed)
        assert isinstance(await copy.claim("acct-1", lease=LEASE), Busy)
        await first.heartbeat()
        await first.join(live_within=5.0)  # itself: fine
        conn = await asyncpg.connect(pg_url)
        try:
            # This host's previous daemon, killed and restarted at once: its PID is gone.
            await conn.execute("UPDATE nodes SET pid = 2147483646 WHERE node_id = 'web-1'")
            await copy.join(live_within=5.0)
            # Another host beating with this id a moment ago: refused.
            await conn.execute("UPDATE nodes SET host = 'web-7' WHERE node_id = 'web-1'")
        finally:
            await conn.close()
        with pytest.raises(ConfigError) as refused:
            await copy.join(live_within=5.0)
        assert "node id 'web-1' is in use by web-7" in str(refused.value)
        assert "[cluster] node_id" in str(refused.value)
    finally:
        await first.close()
        await copy.close()
