"""The cluster harness itself (tests/faults/cluster.py), where it can run today.

One node on SQLite goes through every move the cluster fault tests make: seed,
wait for refreshes, pause and resume, kill -9 and start again, SIGTERM and
start again under a token load, read the rows and the simulator's counts. The
PostgreSQL side is checked without daemons: a fresh database, its connections
cut, dropped at the end. And whatever happens inside, nothing is left behind.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import asyncpg
import pytest

from tests.faults.cluster import Cluster, PgDatabase, TokenLoad
from tests.faults.procs import percentile


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_one_node_on_sqlite_makes_every_move(tmp_path: Path) -> None:
    with Cluster(
        tmp_path, nodes=1, storage="sqlite", rotate_after=0, latency=0.05, lead=600
    ) as cluster:
        sim_pid = cluster.sim.pid
        node = cluster.nodes[0]
        seeded = cluster.seed([None] * 5 + [1.0 + 0.3 * n for n in range(5)])
        spread = [a for a in seeded.values() if a.due_at > time.time()]
        assert len(spread) == 5
        ledger = cluster.wait_refreshed(list(seeded), after=0.0, timeout=20)
        lateness = [(ledger.first_refresh(a.account_id) or 0) - a.due_at for a in spread]
        assert percentile(lateness, 99) < 1.5, lateness

        cluster.sim.update(latency=1.0)
        calls = cluster.seed([None] * 8)  # due at once: calls in flight for a second
        time.sleep(0.3)
        paused_at, caught = cluster.pause_mid_call(0, keep_rotation=86_400.0)
        assert caught >= 1
        assert time.time() - paused_at > 1.0
        assert not node.ready()
        assert cluster.sim.settings.rotate_after == 86_400.0
        cluster.sim.update(rotate_after=0, latency=0.05)
        cluster.resume(0)
        node.wait_ready()
        cluster.wait_refreshed(list(calls), after=0.0, timeout=20)

        first_pid = node.pid
        cluster.kill9(0)
        assert gone(first_pid)
        cluster.start(0)

        with TokenLoad(cluster, list(seeded), threads=2) as load:
            time.sleep(0.5)
            assert cluster.restart(0) == 0
            time.sleep(0.5)
        result = load.result
        assert result.calls > 0
        assert result.statuses[200] > 0
        assert not result.server_errors
        assert not result.transport_errors
        assert result.wrong_tokens == 0

        pids = [node.pid]
        assert {a["status"] for a in cluster.accounts().values()} == {"active"}
        assert cluster.settle_and_check() == []
        assert not node.alive
        assert cluster.sim.double_uses() == {"concurrent_use": 0, "stale_use": 0}
        rows = cluster.rows()
        assert set(rows) == set(cluster.seeded)
    assert all(gone(pid) for pid in [*pids, sim_pid])


def test_a_failure_inside_leaves_no_process_behind(tmp_path: Path) -> None:
    pids: list[int] = []
    with (  # noqa: PT012 - the body is the point
        pytest.raises(RuntimeError, match="inside"),
        Cluster(tmp_path, nodes=1, storage="sqlite") as cluster,
    ):
        pids = [cluster.sim.pid, cluster.nodes[0].pid]
        cluster.pause(0)  # a paused node must still be stopped
        raise RuntimeError("inside")
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)


def test_several_nodes_need_postgresql(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        Cluster(tmp_path, nodes=2, storage="sqlite")


def test_a_fresh_database_whose_connections_can_be_cut_and_which_is_dropped() -> None:
    database = PgDatabase()
    try:

        async def hold_two() -> tuple[int, bool]:
            first = await asyncpg.connect(database.url)
            second = await asyncpg.connect(database.url)
            try:
                ended = await asyncio.to_thread(database.terminate_backends)
                try:
                    await first.fetchval("SELECT 1")
                # A terminated connection may also fail as InternalClientError ("cannot
                # switch to state 11"), when the server's FATAL arrives mid-prepare.
                except (
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,
                    ConnectionError,
                ):
                    cut = True
                else:
                    cut = False
                return ended, cut
            finally:
                first.terminate()
                second.terminate()

        ended, cut = asyncio.run(hold_two())
        assert (ended, cut) == (2, True)
        assert database.backends() == 0
    finally:
        database.close()
    assert not PgDatabase.exists(database.name)
