"""Several daemons on one PostgreSQL database, in this process, against one simulator.

Each daemon is a whole :class:`~qbo_daemon.runtime.daemon.Daemon` with its own
listeners; they share the database, the simulator and a hand-moved clock. What
is checked is what an operator would check: the simulator's log of refresh
calls (one per due refresh, never two with one refresh token), the tokens the
API hands out on either node, and each node's timers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from qbo_daemon.engine.cluster import Cluster
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.port import Claimed
from qbo_daemon.store.postgres.storage import PostgresStorage
from tests.harness import RunningDaemon, next_refresh, start_daemon, wait_for
from tests.manual_clock import ManualClock
from tests.pg_cut import ReplyCutter

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
Nodes = Callable[[int], Awaitable[list[RunningDaemon]]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[IntuitSimulator]:
    simulator = IntuitSimulator(SimulatorSettings(), clock=clock)
    await simulator.start()
    yield simulator
    await simulator.close()


async def start_node(
    sim: IntuitSimulator,
    clock: ManualClock,
    data_dir: Path,
    *,
    url: str,
    node_id: str,
    api_key: str,
    encryption_key: str,
) -> RunningDaemon:
    """One daemon in this process on the PostgreSQL database at ``url``."""
    data_dir.mkdir()
    return await start_daemon(
        sim,
        data_dir,
        clock=clock,
        api_key=api_key,
        encryption_key=encryption_key,
        storage_url=url,
        pkce="false",
        lead="55m",  # due 5 minutes after a connect: inside the timers' window
        extra=f'\n[cluster]\nnode_id = "{node_id}"\n',
    )


@pytest.fixture
async def nodes(
    sim: IntuitSimulator, clock: ManualClock, pg_url: str, tmp_path: Path
) -> AsyncIterator[Nodes]:
    """Start ``n`` daemons sharing the database at ``pg_url``; all stopped at the end."""
    started: list[RunningDaemon] = []
    encryption_key = generate_key()
    api_key = "test-api-key-" + generate_key()[:16]

    async def start(n: int) -> list[RunningDaemon]:
        for index in range(len(started), len(started) + n):
            started.append(
                await start_node(
                    sim,
                    clock,
                    tmp_path / f"node{index}",
                    url=pg_url,
                    node_id=f"node{index}",
                    api_key=api_key,
                    encryption_key=encryption_key,
                )
            )
        # Each has heard of the others before the test goes on.
        await wait_for(
            lambda: all(len(d.services.cluster.live) == len(started) for d in started),  # type: ignore[union-attr]
            timeout=10,
        )
        return started[-n:]

    yield start
    for running in reversed(started):
        await running.shutdown()


def refresh_calls(sim: IntuitSimulator) -> list[str | None]:
    """The refresh tokens presented to the simulator, in order."""
    return [
        e.presented_refresh_token
        for e in sim.request_log
        if e.endpoint == "token" and e.grant_type == "refresh_token"
    ]


async def move_to(clock: ManualClock, when: datetime) -> None:
    clock.advance((when - clock.now()).total_seconds())
    await asyncio.sleep(0.05)


async def test_connected_on_one_node_served_by_the_other_and_refreshed_once(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock
) -> None:
    first, second = await nodes(2)
    assert await first.connect("acme") == 200
    status, token = await second.api("GET", "/v1/accounts/acme/token")
    assert status == 200, token
    stored = await second.services.storage.load("acme")
    assert stored.reconnect_token_at is not None
    # The other node heard of the connection: it has a timer too, without polling.
    await wait_for(lambda: second.services.scheduler.due_at("acme") is not None)

    await move_to(clock, stored.reconnect_token_at + timedelta(seconds=2))
    await wait_for(lambda: len(refresh_calls(sim)) == 1)
    await asyncio.sleep(0.3)  # and no second call
    assert refresh_calls(sim) == [stored.refresh_token]
    refreshed = await first.services.storage.load("acme")
    assert refreshed.version > stored.version
    assert refreshed.reconnect_token_at is not None
    assert refreshed.reconnect_token_at > stored.reconnect_token_at
    for node in (first, second):
        await wait_for(lambda node=node: node.services.scheduler.due_at("acme") is not None)
        due = node.services.scheduler.due_at("acme")
        assert due is not None
        assert due >= refreshed.reconnect_token_at


async def test_a_token_asked_of_every_node_at_once_is_refreshed_by_one_call(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock
) -> None:
    a, b, c = await nodes(3)
    assert await a.connect("acme") == 200
    stored = await a.services.storage.load("acme")
    assert stored.token_expires_at is not None
    # Slow answers: every node asks while one call is in flight.
    sim.settings = replace(sim.settings, latency=0.5)
    clock.advance((stored.token_expires_at - clock.now()).total_seconds() + 1)
    answers = await asyncio.gather(
        *(node.api("GET", "/v1/accounts/acme/token") for node in (a, b, c, a, b, c))
    )
    assert [status for status, _ in answers] == [200] * 6, answers
    tokens = {body["access_token"] for _, body in answers}
    assert len(tokens) == 1
    assert tokens != {stored.access_token}
    assert refresh_calls(sim) == [stored.refresh_token]


async def test_a_node_that_stops_hands_its_accounts_to_the_others(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock
) -> None:
    a, b = await nodes(2)
    for n in range(6):
        assert await a.connect(f"acct-{n}") == 200
    rows = [await a.services.storage.load(f"acct-{n}") for n in range(6)]
    await a.shutdown()
    await wait_for(lambda: b.services.cluster.live == ("node1",), timeout=10)  # type: ignore[union-attr]
    latest = max(r.reconnect_token_at for r in rows if r.reconnect_token_at)
    await move_to(clock, latest + timedelta(seconds=2))

    async def all_refreshed() -> bool:
        now = [await b.services.storage.load(row.account_id) for row in rows]
        return all(
            n.version > r.version and n.failure_count == 0 for n, r in zip(now, rows, strict=True)
        )

    await wait_for(all_refreshed)
    assert sorted(refresh_calls(sim), key=str) == sorted((r.refresh_token for r in rows), key=str)


async def counted(node: RunningDaemon, name: str, label: str) -> dict[str, float]:
    """The node's ``/metrics`` samples of ``name``, by the value of ``label``."""
    async with node.session.get(node.api_url + "/metrics") as response:
        text = await response.text()
    return {
        s.labels[label]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_a_node_that_joins_later_shares_the_work_without_racing(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock
) -> None:
    """The first node timed every account as its own while it was alone; once it
    hears of the second, the second's accounts wait for the second. Each node
    refreshes the accounts it is preferred for, and no claim is refused."""
    (a,) = await nodes(1)
    ids = [f"acct-{n}" for n in range(12)]
    for account_id in ids:
        assert await a.connect(account_id) == 200
    rows = [await a.services.storage.load(account_id) for account_id in ids]
    (b,) = await nodes(1)  # both have heard of each other
    cluster = b.services.cluster
    assert cluster is not None
    mine = {node: sum(cluster.preferred(i) == node for i in ids) for node in ("node0", "node1")}
    assert mine["node0"] > 0
    assert mine["node1"] > 0
    due = max(r.reconnect_token_at for r in rows if r.reconnect_token_at)

    await move_to(clock, due + timedelta(seconds=0.2))  # within the preferred node's head start

    async def all_refreshed() -> bool:
        now = [await a.services.storage.load(i) for i in ids]
        return all(n.version > r.version for n, r in zip(now, rows, strict=True))

    await wait_for(all_refreshed)
    await move_to(clock, due + timedelta(seconds=3))  # past it: nothing is left to take over
    await asyncio.sleep(0.3)
    assert sorted(refresh_calls(sim), key=str) == sorted((r.refresh_token for r in rows), key=str)
    for node, node_id in ((a, "node0"), (b, "node1")):
        claims = await counted(node, "qbo_cluster_claims_total", "result")
        assert claims.get("busy", 0) + claims.get("not_due", 0) == 0, (node_id, claims)
        assert claims.get("claimed") == mine[node_id], (node_id, claims)
        attempts = await counted(node, "qbo_refresh_attempts_total", "outcome")
        assert attempts.get("success") == mine[node_id], (node_id, attempts)


async def test_an_overdue_account_keeps_its_due_time_on_a_node_that_is_not_first(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock, pg_url: str
) -> None:
    """A node that starts with accounts long overdue gives their preferred node a head
    start, but keeps their due time: shown as due then, and the most overdue go first
    if it takes them over."""
    (a,) = await nodes(1)
    ids = [f"acct-{n}" for n in range(8)]
    for account_id in ids:
        assert await a.connect(account_id) == 200
    overdue = START - timedelta(hours=1)
    conn = await asyncpg.connect(pg_url)
    try:  # as if every node had been down for an hour and more
        await conn.execute("UPDATE accounts SET reconnect_token_at = $1", overdue)
    finally:
        await conn.close()

    (b,) = await nodes(1)  # reads them overdue at its start
    cluster = b.services.cluster
    assert cluster is not None
    others = [i for i in ids if cluster.preferred(i) == "node0"]
    assert others
    for account_id in others:
        assert b.services.scheduler.due_at(account_id) == overdue, account_id


async def test_a_node_that_comes_up_or_leaves_is_seen_at_once_not_at_the_next_heartbeat(
    pg_url: str,
) -> None:
    """Heartbeats a minute apart: only the announcement can tell the first node."""
    cipher = Cipher([EncryptionKey.from_text(generate_key())])
    stores = [await PostgresStorage.open(pg_url, cipher, node_id=n) for n in ("a", "b")]
    first, second = (Cluster(store, heartbeat_every=60.0) for store in stores)
    beating = asyncio.create_task(first.run())
    try:
        await first.start()
        assert first.live == ("a",)
        await second.start()
        await wait_for(lambda: set(first.live) == {"a", "b"}, timeout=5)
        await second.leave()
        await wait_for(lambda: first.live == ("a",), timeout=5)
    finally:
        beating.cancel()
        await first.leave()
        for store in stores:
            await store.close()


async def abandoned_call(node: RunningDaemon, sim: IntuitSimulator, pg_url: str) -> datetime:
    """``acme`` connected through ``node``; then a node that is gone claimed it and called
    Intuit, which rotated the token, and never stored the answer (it was paused, or died).

    Returns when the account is due: its row's ``reconnect_token_at``, still as before.
    """
    assert await node.connect("acme") == 200
    stored = await node.services.storage.load("acme")
    assert stored.refresh_token is not None
    assert stored.reconnect_token_at is not None
    cipher = Cipher([EncryptionKey.from_text(node.encryption_key)])
    ghost = await PostgresStorage.open(pg_url, cipher, node_id="ghost")
    try:
        assert isinstance(await ghost.claim("acme", lease=0.2), Claimed)
    finally:
        await ghost.close()
    await asyncio.sleep(0.3)  # its lease runs out
    sim.invalidate(stored.refresh_token)
    return stored.reconnect_token_at


async def test_a_refusal_after_taking_over_an_unanswered_call_is_not_final_at_once(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock, pg_url: str, tmp_path: Path
) -> None:
    (a,) = await nodes(1)
    due = await abandoned_call(a, sim, pg_url)

    await move_to(clock, due + timedelta(seconds=1))
    await wait_for(lambda: len(refresh_calls(sim)) == 1)

    async def noted() -> bool:
        return (await a.services.storage.load("acme")).failure_count == 1

    await wait_for(noted)
    row = await a.services.storage.load("acme")
    assert row.status.value == "active"  # not needs_reconnect: the ghost may come back
    assert row.last_error is not None
    assert "not final" in row.last_error
    assert await next_refresh(a.services, "acme") is not None


async def test_an_outage_after_taking_over_keeps_the_refusal_from_being_final(
    nodes: Nodes, sim: IntuitSimulator, clock: ManualClock, pg_url: str
) -> None:
    (a,) = await nodes(1)
    due = await abandoned_call(a, sim, pg_url)
    sim.inject("500", 1)  # and Intuit fails the first try of the node that takes over

    await move_to(clock, due + timedelta(seconds=1))

    async def failures(n: int) -> bool:
        return (await a.services.storage.load("acme")).failure_count == n

    await wait_for(lambda: failures(1))
    await move_to(clock, clock.now() + timedelta(seconds=25))  # past the retry's backoff
    await wait_for(lambda: failures(2))
    row = await a.services.storage.load("acme")
    assert row.status.value == "active"
    assert row.last_error is not None
    assert "not final" in row.last_error


# -- a commit in doubt ------------------------------------------------------------------


@pytest.fixture
async def cutter(pg_url: str) -> AsyncIterator[ReplyCutter]:
    # "AS fenced" is in the commit statement only (store/postgres/accounts.py).
    proxy = ReplyCutter(pg_url, marker="AS fenced")
    yield proxy
    await proxy.close()


async def test_a_commit_whose_reply_was_lost_is_stored_once_and_not_superseded(
    sim: IntuitSimulator, clock: ManualClock, cutter: ReplyCutter, tmp_path: Path
) -> None:
    """The connection drops between PostgreSQL committing the new tokens and the daemon
    hearing so. The daemon holds the tokens and writes them again; that write finds the
    row moved on to exactly these tokens: the refresh was stored, nothing superseded.
    Taken as another node's newer write, it was logged at error level as dropped."""
    node = await start_node(
        sim,
        clock,
        tmp_path / "node0",
        url=await cutter.start(),
        node_id="node0",
        api_key="test-api-key-" + generate_key()[:16],
        encryption_key=generate_key(),
    )
    try:
        assert await node.connect("acme") == 200
        stored = await node.services.storage.load("acme")
        assert stored.reconnect_token_at is not None

        with structlog.testing.capture_logs() as logs:
            await move_to(clock, stored.reconnect_token_at + timedelta(seconds=0.1))
            await asyncio.wait_for(cutter.cut.wait(), timeout=10)
            # The tokens are held; their write is retried after its backoff.
            await wait_for(lambda: node.services.scheduler.holding_tokens)
            clock.advance(1.0)
            await wait_for(lambda: not node.services.scheduler.holding_tokens)
            ended = {"refresh.succeeded", "refresh.superseded"}
            await wait_for(lambda: any(e["event"] in ended for e in logs))

        events = [e["event"] for e in logs]
        assert "refresh.persist_failed" in events  # the lost reply, as an operator sees it
        errors = [e for e in logs if e["log_level"] == "error"]
        assert "refresh.superseded" not in events, errors
        assert errors == []
        assert refresh_calls(sim) == [stored.refresh_token]  # one call, not a second
        row = await node.services.storage.load("acme")
        assert row.version == stored.version + 1  # written once: the retry changed nothing
        assert row.access_token != stored.access_token
        assert row.failure_count == 0
        assert row.reconnect_token_at is not None
        assert row.reconnect_token_at > stored.reconnect_token_at
        status, token = await node.api("GET", "/v1/accounts/acme/token")
        assert status == 200
        assert token["access_token"] == row.access_token
    finally:
        await node.shutdown()
