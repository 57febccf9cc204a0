"""Thousands of concurrent ``GET .../token`` calls over many accounts while refreshes run.

The daemon (a subprocess) keeps 300 accounts whose tokens it refreshes every
2 seconds against the simulator (another process, 20 ms per call), so the
scheduler, the refresher, the group commit and the reader all work while the
calls come in: thousands at once through a few hundred connections. Every
answer must be a 200 with a token the simulator issued to that account's
connection (checked by realm), and the p99 answer time is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, SimulatorProcess, parse_time, percentile

ACCOUNTS = 300
CALLS = 4000
CONNECTIONS = 256
WAVES = 2


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[tuple[SimulatorProcess, DaemonProcess, dict[str, str]]]:
    sim = SimulatorProcess(expires_in=120, rotate_after=86_400.0, latency=0.02).start()
    daemon = DaemonProcess(tmp_path / "daemon", sim, lead="118s")  # due 2 s after each refresh
    try:
        daemon.start()
        realms = {}
        for number in range(ACCOUNTS):
            grant = sim.grant()
            realms[f"acct-{number:03d}"] = grant["realm_id"]
            daemon.import_grant(f"acct-{number:03d}", grant, overdue=number % 3 == 0)
        time.sleep(3.0)  # past every account's first refresh time: refreshes run from now on
        yield sim, daemon, realms
        assert daemon.terminate() == 0
    finally:
        daemon.close()
        sim.close()


async def test_concurrent_token_reads_during_refreshes(
    loaded: tuple[SimulatorProcess, DaemonProcess, dict[str, str]], report: Report
) -> None:
    sim, daemon, realms = loaded
    ids = sorted(realms)
    headers = {"Authorization": f"Bearer {daemon.api_key}"}
    latencies: list[float] = []  # from the call's start, waiting for a connection included
    served: list[float] = []  # from the moment it had a connection
    slots = asyncio.Semaphore(CONNECTIONS)
    failures: Counter[str] = Counter()
    loop = asyncio.get_running_loop()

    async def one(session: aiohttp.ClientSession, account_id: str) -> None:
        began = loop.time()
        await slots.acquire()
        sent = loop.time()
        try:
            async with session.get(f"{daemon.api_url}/v1/accounts/{account_id}/token") as answer:
                body = await answer.json()
                if answer.status != 200:
                    failures[f"http {answer.status}: {body.get('error')}"] += 1
                elif body["realm_id"] != realms[account_id] or not body["access_token"]:
                    failures["wrong token"] += 1
                elif parse_time(body["expires_at"]) <= time.time():
                    failures["expired token served"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures[type(exc).__name__] += 1
        finally:
            slots.release()
        latencies.append(loop.time() - began)
        served.append(loop.time() - sent)

    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=60)
    began_at = time.time()
    started = loop.time()
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        for _ in range(WAVES):
            await asyncio.gather(*(one(session, ids[n % len(ids)]) for n in range(CALLS)))
    elapsed = loop.time() - started
    ended_at = time.time()
    refreshes = sum(
        1
        for e in sim.log()
        if e["grant_type"] == "refresh_token"
        and e["status"] == 200
        and began_at <= parse_time(e["at"]) <= ended_at
    )
    figures = {
        "accounts": ACCOUNTS,
        "calls": CALLS * WAVES,
        "in_flight_at_once": CALLS,
        "connections": CONNECTIONS,
        "errors": sum(failures.values()),
        "p50_ms": round(percentile(served, 50) * 1000, 1),
        "p99_ms": round(percentile(served, 99) * 1000, 1),
        "max_ms": round(max(served) * 1000, 1),
        "p99_ms_incl_queueing_for_a_connection": round(percentile(latencies, 99) * 1000, 1),
        "calls_per_s": round(CALLS * WAVES / elapsed),
        "refreshes_meanwhile": refreshes,
    }
    report("load", figures)
    assert not failures, failures
    assert len(latencies) == CALLS * WAVES
    assert refreshes > 0, "no refresh ran during the load"
