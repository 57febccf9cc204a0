"""``python -m bench --storage postgresql://… --nodes N``: several daemons on PostgreSQL.

Each phase makes its own database on the server (bench/pg.py) and runs the
real daemon, one process per node (``[storage] url``, ``[cluster] node_id``),
against the simulator:

- **start-up and lateness**: ``--accounts`` rows, of which ``--due-soon`` real
  grants fall due over ``--lateness-window`` seconds from ``--lateness-delay``
  after the launch, and the rest (accounts the simulator does not know) are due
  after the run, spread over the next 50 minutes, so that each node's 10-minute
  window of timers holds about a sixth of them. Run with one node, then with
  ``--nodes`` on the same database (another set of due grants). Start-up
  (ready, RSS) is each node's; lateness is when the request left (the
  refresher's ``started_at``, committed with the tokens) minus the due time.
- **storms**: ``--overdue`` grants overdue at start, drained by one node and by
  ``--nodes`` nodes, at each ``--latency`` and ``--concurrency`` (per node).
  The rate runs from the moment the last node is ready to the last commit.

Every run also counts the calls the simulator received per refresh token: one
account refreshed by two nodes would show as a second call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bench import pg, pg_report
from bench.dataset import mint_grants
from bench.lab import BenchSettings, DaemonRun, Lab
from bench.procs import load_average, machine_cpu, memory_kib, named_cpu
from bench.report import distribution, machine
from qbo_daemon.core.dburl import redact_url

RESULTS = Path(__file__).parent / "results"

# The idle accounts fall due over this span after the runs: a 10-minute window
# holds about a sixth of them.
IDLE_SPAN = timedelta(minutes=40)
CALIBRATION = 20_000  # idle rows seeded first, to time the seeding


def _pg_config(url: str, node_id: str, text: str) -> str:
    """The bench's daemon configuration on PostgreSQL: ``url`` instead of ``path``."""
    lines = [f'url = "{url}"' if line.startswith("path = ") else line for line in text.splitlines()]
    return "\n".join(lines) + f'\n\n[cluster]\nnode_id = "{node_id}"\n'


async def launch_nodes(
    lab: Lab, name: str, url: str, count: int, concurrency: int
) -> list[DaemonRun]:
    """``count`` daemons on ``url``, started at once; returns when every one is ready."""
    launches = [
        lab.launch_daemon(
            f"{name}-node{n}",
            lab.workdir / f"{name}-node{n}",
            concurrency,
            edit_config=partial(_pg_config, url, f"node{n}"),
        )
        for n in range(1, count + 1)
    ]
    results = await asyncio.gather(*launches, return_exceptions=True)
    runs = [r for r in results if isinstance(r, DaemonRun)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await stop_nodes(runs)
        raise failed[0]
    return runs


async def stop_nodes(runs: list[DaemonRun]) -> None:
    await asyncio.gather(*(run.stop() for run in runs))


def _alive(runs: list[DaemonRun]) -> None:
    for run in runs:
        run.child.check_alive()


def _node(run: DaemonRun) -> dict[str, Any]:
    marks = run.marks
    started = run.scheduler_started()
    return {
        "to_ready_s": marks["ready_wall"] - marks["t0"],
        "to_scheduled_s": (started[0] - marks["t0"]) if started else None,
        "scheduled": started[1] if started else 0,
        "rss_at_ready_mib": marks["memory_kib"]["VmRSS"] / 1024,
        "peak_rss_at_ready_mib": marks["memory_kib"]["VmHWM"] / 1024,
        "cpu_to_ready_s": marks["ready_cpu"],
    }


async def _calls_per_token(lab: Lab, tokens: set[str]) -> dict[str, int]:
    """How many calls the simulator got for each of ``tokens`` (its log, newest first)."""
    log = await lab.sim("GET", f"log?limit={2 * len(tokens) + 1000}")
    calls: dict[str, int] = {}
    for entry in log["entries"]:
        token = entry.get("presented_refresh_token")
        if entry["endpoint"] == "token" and token in tokens:
            calls[token] = calls.get(token, 0) + 1
    return calls


async def startup_and_lateness(lab: Lab, server_url: str, nodes: int) -> dict[str, Any]:
    """One database of ``accounts`` rows; a lateness run on one node, then on ``nodes``."""
    settings = lab.settings
    due_soon = settings.due_soon
    sets = [(1, lab.grants[:due_soon])]
    if nodes > 1:
        sets.append((nodes, lab.grants[due_soon : 2 * due_soon]))
    known = [g for _, grants in sets for g in grants]
    # Each run: the delay, the window, and launching and stopping the nodes.
    run_s = settings.lateness_delay + settings.lateness_window + 30
    runs_s = run_s * len(sets)
    idle_count = settings.accounts - len(known)
    calibration = min(CALIBRATION, idle_count)
    url = await pg.create_database(server_url)
    try:
        began = datetime.now(UTC)
        # The grants wait beyond every window until their run retimes them; so do the
        # first idle rows, which time the seeding (encryption is its cost).
        parked = began + timedelta(hours=2)
        seeded = await pg.seed(
            url,
            lab.key,
            {g.account_id: parked for g in known},
            known,
            pg.Idle(calibration, parked, timedelta(minutes=10)),
        )
        rate = calibration / max(seeded["idle_s"], 1e-3)
        rest = idle_count - calibration
        # The rest fall due from just after the runs: planned with the rate seen so far
        # (and a quarter more), then waited for if the seeding was faster.
        idle_start = datetime.now(UTC) + timedelta(seconds=1.25 * rest / rate + runs_s + 10)
        more = await pg.seed(
            url, lab.key, {}, [], pg.Idle(rest, idle_start, IDLE_SPAN, calibration)
        )
        seeded = {k: seeded[k] + more[k] for k in seeded}
        wait = (idle_start - datetime.now(UTC)).total_seconds() - runs_s
        if wait < 0:
            raise RuntimeError(f"seeding took {-wait:.0f}s longer than planned; run again")
        await asyncio.sleep(wait)
        runs = [await _lateness_run(lab, url, count, grants) for count, grants in sets]
        return {
            "database": pg.database_name(url),
            "accounts": settings.accounts,
            "idle": idle_count,
            "idle_from_s": (idle_start - began).total_seconds(),
            "waited_s": wait,
            "seed": seeded,
            "runs": runs,
        }
    finally:
        await pg.drop_database(server_url, url)


async def _lateness_run(lab: Lab, url: str, nodes: int, grants: list[Any]) -> dict[str, Any]:
    settings = lab.settings
    rng = random.Random(3 + nodes)
    first = datetime.now(UTC) + timedelta(seconds=settings.lateness_delay)
    due = {
        g.account_id: first + timedelta(seconds=settings.lateness_window * rng.random())
        for g in grants
    }
    await pg.retime(url, due)
    before = await pg.committed(url)
    await lab.set_latency(0.0)
    await lab.reset_simulator()
    load_before = load_average()
    runs = await launch_nodes(lab, f"lateness-{nodes}", url, nodes, settings.lateness_concurrency)
    try:
        done_at = await pg.wait_committed(
            url,
            before + len(due),
            partial(_alive, runs),
            timeout=settings.lateness_delay + settings.lateness_window + 120,
            poll=0.1,
        )
        memory = [pg_memory(run) for run in runs]
        calls = await _calls_per_token(lab, {g.refresh_token for g in grants})
    finally:
        await stop_nodes(runs)
    ready = max(run.marks["ready_wall"] for run in runs)
    due_ts = {a: at.timestamp() for a, at in due.items()}
    started: dict[str, float] = {}
    attempts = await pg.attempts(url)
    for account, at, outcome in attempts:
        if account in due_ts and outcome == "success":
            started[account] = min(at, started.get(account, at))
    after_ready = [a for a in due_ts if due_ts[a] > ready]
    return {
        "nodes": nodes,
        "load_average_before": load_before,
        "startup": [_node(run) for run in runs],
        "memory_end": memory,
        "due": len(due),
        "due_before_ready": len(due) - len(after_ready),
        "refreshed": len(started),
        "departure_ms": distribution(
            [(started[a] - due_ts[a]) * 1000 for a in after_ready if a in started]
        ),
        "calls_per_token_max": max(calls.values(), default=0),
        "tokens_called": len(calls),
        # An idle account is due after the runs: an attempt on one spoils the run.
        "idle_attempts": sum(1 for account, _, _ in attempts if account.startswith("idle-")),
        "all_done_after_last_due_s": done_at - max(due_ts.values()),
        "load_average_after": load_average(),
    }


def pg_memory(run: DaemonRun) -> dict[str, float]:
    kib = memory_kib(run.child.pid)
    return {"rss_mib": kib["VmRSS"] / 1024, "peak_rss_mib": kib["VmHWM"] / 1024}


async def storm(
    lab: Lab, server_url: str, nodes: int, latency: float, concurrency: int, count: int
) -> dict[str, Any]:
    """``count`` grants overdue at start, drained by ``nodes`` daemons at ``concurrency`` each."""
    grants = lab.grants[:count]
    url = await pg.create_database(server_url)
    try:
        overdue = datetime.now(UTC) - timedelta(minutes=1)
        await pg.seed(url, lab.key, {g.account_id: overdue for g in grants}, grants)
        await lab.set_latency(latency)
        await lab.reset_simulator()
        load_before = load_average()
        name = f"storm-{int(latency * 1000)}ms-c{concurrency}-n{nodes}"
        runs = await launch_nodes(lab, name, url, nodes, concurrency)
        try:
            all_ready = max(run.marks["ready_wall"] for run in runs)
            at_ready = await pg.committed(url)
            sim_start = lab.simulator.mark()
            cpu_start = [run.mark() for run in runs]
            pg_start, machine_start = named_cpu("postgres"), machine_cpu()
            done_at = await pg.wait_committed(
                url,
                count,
                partial(_alive, runs),
                timeout=60 + 20 * count * max(latency, 0.002) / concurrency,
                poll=lab.settings.poll,
            )
            sim_end = lab.simulator.mark()
            cpu_end = [run.mark() for run in runs]
            pg_end, machine_end = named_cpu("postgres"), machine_cpu()
            calls = await _calls_per_token(lab, {g.refresh_token for g in grants})
        finally:
            await stop_nodes(runs)
        starts = [at for _, at, _ in await pg.attempts(url)]
        durable = await pg.durable(url)
    finally:
        await pg.drop_database(server_url, url)
    measured = count - at_ready
    window = done_at - all_ready
    cpu = sum(e.cpu - s.cpu for s, e in zip(cpu_start, cpu_end, strict=True))
    return {
        "database": pg.database_name(url),
        "nodes": nodes,
        "latency_ms": latency * 1000,
        "concurrency": concurrency,
        "overdue": count,
        "committed_at_ready": at_ready,
        "refreshes_measured": measured,
        "rate_per_s": measured / window,
        "rate_first_to_last_per_s": count / (done_at - min(starts)),
        "cpu_per_1000_s": cpu / max(measured, 1) * 1000,
        "simulator_cpu_share": (sim_end.cpu - sim_start.cpu) / (sim_end.wall - sim_start.wall),
        # Cores' worth PostgreSQL used, and how busy the whole machine was, over the drain:
        # whether more nodes could have gone faster on this machine at all.
        "postgres_cpu_share": (pg_end - pg_start) / (sim_end.wall - sim_start.wall),
        "machine_busy_share": (machine_end[0] - machine_start[0])
        / max(machine_end[1] - machine_start[1], 1e-9),
        "calls_per_token_max": max(calls.values(), default=0),
        "durable": durable,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


async def run(lab: Lab, server_url: str, nodes: int, phases: list[str]) -> dict[str, Any]:
    """Every PostgreSQL phase on the simulator ``lab`` runs; the results' dict."""
    settings = lab.settings
    wanted = max(2 * settings.due_soon, settings.overdue, settings.slow_overdue or 0)
    lab.grants = await mint_grants(lab.session, lab.sim_url, wanted)
    results: dict[str, Any] = {"nodes": nodes, "postgres": await pg.server_version(server_url)}
    if "lateness" in phases:
        results["million"] = await startup_and_lateness(lab, server_url, nodes)
        _progress("start-up and lateness on PostgreSQL measured")
    results["pg_storms"] = []
    if "storms" in phases:
        for latency in settings.latencies:
            count = settings.overdue
            if latency > 0 and settings.slow_overdue is not None:
                count = settings.slow_overdue
            for concurrency in settings.concurrencies:
                for n in sorted({1, nodes}):
                    results["pg_storms"].append(
                        await storm(lab, server_url, n, latency, concurrency, count)
                    )
                    _progress(
                        f"storm on PostgreSQL at {latency * 1000:g} ms, "
                        f"concurrency {concurrency}, {n} node(s)"
                    )
    return results


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def measure(
    settings: BenchSettings, workdir: Path, phases: list[str], server_url: str, nodes: int
) -> dict[str, Any]:
    """The PostgreSQL run: its own simulator process, every phase, the goals."""
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "settings": asdict(settings),
        "storage": redact_url(server_url),
        "load_average_start": load_average(),
    }
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        lab = await Lab.start_simulator(settings, workdir, session)
        try:
            results.update(await run(lab, server_url, nodes, phases))
        finally:
            await lab.simulator.stop()
    results["load_average_end"] = load_average()
    results["goals"] = pg_report.goals(results)
    return results


def _redacted(arg: str) -> str:
    name, equals, value = arg.partition("=")
    if "://" not in arg:
        return arg
    return f"{name}={redact_url(value)}" if equals and name.startswith("--") else redact_url(arg)


def main(args: argparse.Namespace, settings: BenchSettings, argv: Sequence[str]) -> int:
    """``python -m bench --storage postgresql://…``: run, print, write JSON (and docs)."""
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qbo-bench-pg-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shown: list[str] = []
    skip = False
    for arg in argv:  # the command as run, less where it wrote (local paths)
        if not skip and not arg.startswith(("--out", "--workdir")):
            shown.append(arg)
        skip = arg in ("--out", "--workdir")
    try:
        results = asyncio.run(measure(settings, workdir, args.only, args.storage, args.nodes))
        # A URL may hold a password: masked (and only URLs: the rest is numbers and names).
        words = (_redacted(a) for a in shown)
        results["command"] = " ".join(["python -m bench", *words])
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    out: Path = args.out or RESULTS / (
        f"{datetime.now(UTC):%Y%m%d-%H%M%S}-pg-n{settings.accounts}-x{args.nodes}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(pg_report.table(results))
    print(f"\nresults: {out}")
    if args.write_docs:
        pg_report.write_docs(pg_report.docs_blocks(results))
        print(f"written: {pg_report.DOC}")
    return 0
