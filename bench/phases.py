"""The measurements: start-up and lateness, catch-up storms, the ceiling, the cron batch.

Each phase works on its own copy of the base database, so each starts from the
same N accounts whatever the phases before it did.

How "the moment a request leaves" is observed (lateness): the refresher stamps
``started_at`` on the wall clock immediately before it hands the request to
aiohttp, and commits it with the new tokens in the ``refresh_attempts`` row;
lateness is that stamp minus the ``reconnect_token_at`` the bench gave the
account. The simulator's arrival stamp of the same request (its log maps the
presented refresh token back to the account) is reported beside it: an upper
bound that adds loopback, the simulator's own queueing and HTTP parsing.
"""

from __future__ import annotations

import json
import random
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.dataset import copy_database, retime
from bench.lab import CLIENT_ID, CLIENT_SECRET, Lab, wait_committed
from bench.procs import Child, load_average, memory_kib
from bench.report import distribution


async def startup_and_lateness(lab: Lab) -> dict[str, Any]:
    """N accounts scheduled, ``due_soon`` of them due within the run, the rest later."""
    settings = lab.settings
    database = lab.workdir / "lateness.sqlite3"
    copy_database(lab.base_db, database)
    rng = random.Random(3)
    first = datetime.now(UTC) + timedelta(seconds=settings.lateness_delay)
    chosen = lab.grants[-settings.due_soon :]
    due = {
        g.account_id: first + timedelta(seconds=settings.lateness_window * rng.random())
        for g in chosen
    }
    retime(database, due)
    await lab.set_latency(0.0)
    await lab.reset_simulator()
    load_before = load_average()
    run = await lab.launch_daemon("lateness", database, settings.lateness_concurrency)
    try:
        marks = run.marks
        sim_start, daemon_start = lab.simulator.mark(), run.mark()
        done_at = await wait_committed(
            database,
            len(due),
            run.child,
            timeout=settings.lateness_delay + settings.lateness_window + 120,
            poll=0.1,
        )
        sim_end, daemon_end = lab.simulator.mark(), run.mark()
        memory_end = memory_kib(run.child.pid)
        log = await lab.sim("GET", f"log?limit={2 * len(due) + 100}")
    finally:
        await run.stop()
    started_line = run.scheduler_started()
    t0 = marks["t0"]
    ready = marks["ready_wall"]
    due_ts = {account: at.timestamp() for account, at in due.items()}
    started = _attempt_starts(database)
    by_token = {g.refresh_token: g.account_id for g in chosen}
    arrived = {
        by_token[e["presented_refresh_token"]]: datetime.fromisoformat(e["at"]).timestamp()
        for e in log["entries"]
        if e["endpoint"] == "token" and e["presented_refresh_token"] in by_token
    }
    due_after_ready = [a for a in due_ts if due_ts[a] > ready]
    window = sim_end.wall - sim_start.wall
    return {
        "accounts": settings.accounts,
        "load_average_before": load_before,
        "startup": {
            "to_imported_s": marks["imported"] - t0,
            "to_scheduled_s": (started_line[0] - t0) if started_line else None,
            "to_ready_s": ready - t0,
            "scheduled": started_line[1] if started_line else 0,
            "rss_at_ready_mib": marks["memory_kib"]["VmRSS"] / 1024,
            "peak_rss_at_ready_mib": marks["memory_kib"]["VmHWM"] / 1024,
            "cpu_to_ready_s": marks["ready_cpu"],
        },
        "memory": {
            "rss_end_mib": memory_end["VmRSS"] / 1024,
            "peak_rss_mib": memory_end["VmHWM"] / 1024,
        },
        "lateness": {
            "due": len(due),
            "due_before_ready": len(due) - len(due_after_ready),
            "refreshed": len(started),
            "departure_ms": distribution(
                [(started[a] - due_ts[a]) * 1000 for a in due_after_ready if a in started]
            ),
            "arrival_at_simulator_ms": distribution(
                [(arrived[a] - due_ts[a]) * 1000 for a in due_after_ready if a in arrived]
            ),
            "all_done_after_last_due_s": done_at - max(due_ts.values()),
            "daemon_cpu_s": daemon_end.cpu - daemon_start.cpu,
            "simulator_cpu_share": (sim_end.cpu - sim_start.cpu) / window,
            "window_s": window,
        },
        "load_average_after": load_average(),
    }


async def storm(
    lab: Lab, latency: float, concurrency: int, count: int, loop: str = "asyncio"
) -> dict[str, Any]:
    """``count`` accounts overdue at start, drained by the daemon at ``concurrency``."""
    name = f"storm-{int(latency * 1000)}ms-c{concurrency}-{loop}"
    database = lab.workdir / f"{name}.sqlite3"
    copy_database(lab.base_db, database)
    overdue = datetime.now(UTC) - timedelta(minutes=1)
    retime(database, {g.account_id: overdue for g in lab.grants[:count]})
    await lab.set_latency(latency)
    await lab.reset_simulator()
    load_before = load_average()
    run = await lab.launch_daemon(name, database, concurrency, loop)
    try:
        marks = run.marks
        sim_start = lab.simulator.mark()
        done_at = await wait_committed(
            database,
            count,
            run.child,
            timeout=60 + 20 * count * max(latency, 0.002) / concurrency,
            poll=lab.settings.poll,
        )
        sim_end, daemon_end = lab.simulator.mark(), run.mark()
    finally:
        await run.stop()
    durable = _durable(database)
    refreshes = count - marks["committed_at_ready"]
    window = done_at - marks["ready_wall"]
    cpu = daemon_end.cpu - marks["ready_cpu"]
    first = min(_attempt_starts(database).values())
    return {
        "who": "daemon",
        "loop": loop,
        "latency_ms": latency * 1000,
        "concurrency": concurrency,
        "overdue": count,
        "committed_at_ready": marks["committed_at_ready"],
        "refreshes_measured": refreshes,
        "rate_per_s": refreshes / window,
        "rate_first_to_last_per_s": count / (done_at - first),
        "cpu_per_1000_s": cpu / refreshes * 1000,
        "simulator_cpu_share": (sim_end.cpu - sim_start.cpu) / (sim_end.wall - sim_start.wall),
        "durable": durable,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


async def ceiling(lab: Lab, latency: float, concurrency: int, count: int) -> dict[str, Any]:
    """The same refresh requests from a bare aiohttp client: no database, no crypto."""
    name = f"ceiling-{int(latency * 1000)}ms-c{concurrency}"
    tokens = _tokens(lab, name, count)
    run = await _client_run(
        lab, "bench.ceiling", name, ["--tokens", str(tokens)], latency, concurrency, count
    )
    return {"who": "ceiling", **run}


def _tokens(lab: Lab, name: str, count: int) -> Path:
    """The file of the refresh tokens the bare client sends: the first ``count`` grants'."""
    path = lab.workdir / f"{name}.tokens.json"
    path.write_text(json.dumps([g.refresh_token for g in lab.grants[:count]]))
    return path


# How far off the daemon's rate a paced bare-client run may land and be kept at once.
_PACE_TOLERANCE = 0.10


async def ceiling_at_rate(
    lab: Lab, concurrency: int, count: int, storm: dict[str, Any], unpaced: dict[str, Any]
) -> dict[str, Any] | None:
    """The bare client held to ``storm``'s rate (a daemon's, at 0 ms) by the simulator's wait.

    At 0 ms the bare client runs several times faster than the daemon, and an
    asyncio client's CPU per request falls as its rate rises (each turn of the
    loop serves more answers), so the ceiling's own figure compares two
    programs at two loads. Here the simulator waits before it answers, long
    enough that ``concurrency`` requests in flight arrive at the daemon's rate:
    the client does the same work per request as at 0 ms, only less often.

    The first wait comes from the two rates (``unpaced`` is the ceiling's run at
    0 ms); while a run lands more than 10 % off, the next wait follows from the
    paced runs so far (:func:`_next_wait`), three runs at most. The run nearest
    the rate among those that got every answer is kept (else among those that
    got any); every try is recorded. None when there is nothing to pace against:
    the daemon was not slower, or no run got an answer.
    """
    rate, fastest = storm["rate_per_s"], unpaced["rate_per_s"]
    if rate <= 0 or fastest <= rate:
        return None
    name = f"ceiling-at-rate-c{concurrency}"
    tokens = _tokens(lab, name, count)
    target = concurrency / rate  # seconds per request in each of the C lanes
    tries: list[dict[str, Any]] = []
    wait = target - concurrency / fastest
    for _ in range(3):
        run = await _client_run(
            lab, "bench.ceiling", name, ["--tokens", str(tokens)], wait, concurrency, count
        )
        tries.append({**run, "simulator_latency_ms": wait * 1000})
        if not run["rate_per_s"] or abs(run["rate_per_s"] / rate - 1) <= _PACE_TOLERANCE:
            break
        wait = _next_wait(tries, target, concurrency)
    answered = [t for t in tries if t["ok"] == count] or [t for t in tries if t["ok"]]
    if not answered:
        return None
    best = min(answered, key=lambda t: abs(t["rate_per_s"] - rate))
    # Filed beside the 0 ms storm whose rate it was held to.
    return {
        **best,
        "who": "ceiling at rate",
        "latency_ms": 0.0,
        "paced_to_rate": rate,
        "paced_to_loop": storm["loop"],
        "tries": [{k: t[k] for k in ("simulator_latency_ms", "rate_per_s", "ok")} for t in tries],
    }


def _next_wait(tries: list[dict[str, Any]], target: float, concurrency: int) -> float:
    """The simulator's next wait, from the paced runs so far, toward ``target`` seconds per
    request in each lane.

    After one run the difference is added as it is (the client's own time per
    request stays about the same once it is paced); after two, the line through
    them is followed, unless it does not slope upward (then the difference is
    added again). The unpaced run is no point of that line: the simulator is
    near saturation there, which can make its requests slower than a paced
    run's with a small wait.
    Never negative, never beyond ``target`` (a lane's request takes at least the wait).
    """
    points: list[tuple[float, float]] = [
        (t["simulator_latency_ms"] / 1000, concurrency / t["rate_per_s"]) for t in tries
    ]
    w1, t1 = points[-1]
    slope = 1.0
    if len(points) >= 2:
        w0, t0 = points[-2]
        if w1 != w0 and t1 != t0 and (w1 - w0) / (t1 - t0) > 0:
            slope = (w1 - w0) / (t1 - t0)
    return min(max(0.0, w1 + (target - t1) * slope), target)


async def floor(
    lab: Lab, latency: float, concurrency: int, count: int, without: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The least work the contract asks per refresh (``bench.floor``), on a storm's rows."""
    name = f"floor-{int(latency * 1000)}ms-c{concurrency}" + "".join(f"-no-{w}" for w in without)
    database = lab.workdir / f"{name}.sqlite3"
    accounts = lab.workdir / f"{name}.accounts.json"
    copy_database(lab.base_db, database)
    accounts.write_text(json.dumps([g.account_id for g in lab.grants[:count]]))
    args = ["--db", str(database), "--key-file", str(lab.key_file)]
    args += ["--accounts", str(accounts)]
    args += ["--log", str(lab.workdir / f"{name}.jsonl")]
    for part in without:
        args += ["--without", part]
    run = await _client_run(lab, "bench.floor", name, args, latency, concurrency, count)
    return {"who": "floor", "without": list(without), **run, "durable": _durable(database)}


async def _client_run(
    lab: Lab,
    module: str,
    name: str,
    args: list[str],
    latency: float,
    concurrency: int,
    count: int,
) -> dict[str, Any]:
    """Run a client process of the bench (ceiling, floor) to its end against the simulator
    at ``latency``: its rate and CPU per 1,000 refreshes, and the simulator's share.

    ``args`` are its own; the token URL, credentials, concurrency and output file
    are added here.
    """
    out = lab.workdir / f"{name}.json"
    await lab.set_latency(latency)
    await lab.reset_simulator()
    load_before = load_average()
    args = [*args, "--url", lab.token_url, "--out", str(out), "--concurrency", str(concurrency)]
    args += ["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]
    child = Child(module, args, log=lab.workdir / f"{name}.log")
    sim_start = lab.simulator.mark()
    await _run_to_end(child, timeout=60 + 20 * count * max(latency, 0.002) / concurrency)
    sim_end = lab.simulator.mark()
    result = json.loads(out.read_text())
    return {
        "latency_ms": latency * 1000,
        "concurrency": concurrency,
        "overdue": count,
        "ok": result["ok"],
        "rate_per_s": result["ok"] / result["elapsed"],
        "cpu_per_1000_s": result["cpu"] / max(result["ok"], 1) * 1000,
        "simulator_cpu_share": (sim_end.cpu - sim_start.cpu) / result["elapsed"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


async def cron(lab: Lab, latency: float, count: int, workers: int = 1) -> dict[str, Any]:
    """One run of the classic polling batch on ``workers`` threads, bounded to ``cron_seconds``."""
    name = f"cron-{int(latency * 1000)}ms-w{workers}"
    database, out = lab.workdir / f"{name}.sqlite3", lab.workdir / f"{name}.json"
    copy_database(lab.base_db, database)
    overdue = datetime.now(UTC) - timedelta(minutes=1)
    retime(database, {g.account_id: overdue for g in lab.grants[:count]})
    await lab.set_latency(latency)
    await lab.reset_simulator()
    load_before = load_average()
    args = ["--db", str(database), "--key-file", str(lab.key_file), "--url", lab.token_url]
    args += ["--seconds", str(lab.settings.cron_seconds), "--out", str(out)]
    args += ["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]
    args += ["--workers", str(workers)]
    child = Child("bench.cron", args, log=lab.workdir / f"{name}.log")
    sim_start = lab.simulator.mark()
    await _run_to_end(child, timeout=lab.settings.cron_seconds + 120)
    sim_end = lab.simulator.mark()
    result = json.loads(out.read_text())
    refreshed = max(result["refreshed"], 1)
    return {
        "who": "cron",
        "workers": workers,
        "latency_ms": latency * 1000,
        "selected": result["selected"],
        "refreshed": result["refreshed"],
        "failed": result["failed"],
        "rate_per_s": result["refreshed"] / result["elapsed"],
        "cpu_per_1000_s": result["cpu"] / refreshed * 1000,
        "simulator_cpu_share": (sim_end.cpu - sim_start.cpu) / result["elapsed"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


async def _run_to_end(child: Child, *, timeout: float) -> None:
    """Run a child that finishes by itself (bounded); never leave it behind."""
    await child.start()
    try:
        status = await child.wait(timeout=timeout)
    finally:
        await child.stop()
    if status != 0:
        raise RuntimeError(f"{child.module} failed (exit status {status}):\n{child.tail()}")


def _attempt_starts(database: Path) -> dict[str, float]:
    """Each account's first successful attempt: when its request left (wall seconds)."""
    with closing(sqlite3.connect(database)) as db:
        rows = db.execute(
            "SELECT account_id, MIN(started_at) FROM refresh_attempts "
            "WHERE outcome = 'success' GROUP BY account_id"
        ).fetchall()
    return {account: datetime.fromisoformat(at).timestamp() for account, at in rows}


def _durable(database: Path) -> dict[str, int]:
    """What is on disk after the daemon stopped: refreshed rows and attempts by outcome."""
    with closing(sqlite3.connect(database)) as db:
        (refreshed,) = db.execute("SELECT COUNT(*) FROM accounts WHERE version > 1").fetchone()
        outcomes = dict(
            db.execute("SELECT outcome, COUNT(*) FROM refresh_attempts GROUP BY outcome")
        )
    return {"rows_refreshed": refreshed, **{f"attempts_{k}": v for k, v in outcomes.items()}}
