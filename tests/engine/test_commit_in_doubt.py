"""A refresh whose commit landed but whose reply was lost (PostgreSQL).

The connection drops between PostgreSQL committing the new tokens and the
daemon hearing so. The daemon holds the tokens and writes them again; that
write finds the row moved on, and the row moved on to exactly these tokens:
the refresh was stored, and nothing was superseded. Taken as another node's
newer write, it was logged at error level as a dropped answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from qbo_daemon.store.crypto import generate_key
from tests.harness import RunningDaemon, run_daemon, wait_for
from tests.manual_clock import ManualClock
from tests.pg_cut import ReplyCutter

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[IntuitSimulator]:
    simulator = IntuitSimulator(SimulatorSettings(), clock=clock)
    await simulator.start()
    yield simulator
    await simulator.close()


@pytest.fixture
async def cutter(pg_url: str) -> AsyncIterator[ReplyCutter]:
    # "AS fenced" is in the commit statement only (store/postgres/accounts.py).
    proxy = ReplyCutter(pg_url, marker="AS fenced")
    yield proxy
    await proxy.close()


@pytest.fixture
async def node(
    sim: IntuitSimulator, clock: ManualClock, cutter: ReplyCutter, tmp_path: Path
) -> AsyncIterator[RunningDaemon]:
    url = await cutter.start()
    encryption_key = generate_key()
    api_key = "test-api-key-" + generate_key()[:16]
    text = simulator_config_text(
        sim,
        data_dir=tmp_path,
        api_port=free_port(),
        callback_port=free_port(),
        api_key=api_key,
        encryption_key=encryption_key,
        pkce="false",
        lead="55m",
        extra='\n[cluster]\nnode_id = "node0"\n',
    ).replace("[storage]\n", f'[storage]\nurl = "{url}"\n')
    config_path = tmp_path / "config.toml"
    config_path.write_text(text, encoding="utf-8")
    running = await run_daemon(
        config_path, sim, api_key=api_key, encryption_key=encryption_key, clock=clock
    )
    yield running
    await running.shutdown()


def refresh_calls(sim: IntuitSimulator) -> list[str | None]:
    return [
        e.presented_refresh_token
        for e in sim.request_log
        if e.endpoint == "token" and e.grant_type == "refresh_token"
    ]


async def test_a_commit_whose_reply_was_lost_is_stored_once_and_not_superseded(
    node: RunningDaemon, sim: IntuitSimulator, clock: ManualClock, cutter: ReplyCutter
) -> None:
    assert await node.connect("acme") == 200
    stored = await node.services.storage.load("acme")
    assert stored.reconnect_token_at is not None

    with structlog.testing.capture_logs() as logs:
        clock.advance((stored.reconnect_token_at - clock.now()).total_seconds() + 0.1)
        await asyncio.wait_for(cutter.cut.wait(), timeout=10)
        # The tokens are held; their write is retried after its backoff.
        await wait_for(lambda: node.services.scheduler.holding_tokens)
        clock.advance(1.0)
        await wait_for(lambda: not node.services.scheduler.holding_tokens)
        ended = {"refresh.succeeded", "refresh.superseded"}
        await wait_for(lambda: any(e["event"] in ended for e in logs))

    events = [e["event"] for e in logs]
    assert "refresh.persist_failed" in events  # the lost reply, as an operator sees it
    assert "refresh.superseded" not in events, [e for e in logs if e["log_level"] == "error"]
    assert [e for e in logs if e["log_level"] == "error"] == []
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
