"""Where the daemon's CPU goes in a catch-up storm: ``python -m bench.profile``.

Runs one storm at latency 0 (the simulator answering at once, so only our own
work shows) with the real daemon in its own process, its event loop's thread
profiled by cProfile from readiness until the storm is drained, and prints that
thread's time by part of the program (the HTTP client, the event loop, logging,
storage, the engine...) and the functions that spend the most of it themselves.
The storage threads (SQLite's writes and reads) are not in it: the storm's
figures from ``python -m bench`` count them. cProfile times on the wall clock
(epoll's share includes the loop's idle waits) and adds a cost to every Python
call, so a share here is of the profiled run, not of a plain one; compare
shares, not seconds. ``--write-docs`` puts the table into docs/performance.md
between ``<!-- bench-profile:begin -->`` and ``<!-- bench-profile:end -->``.
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import shutil
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from bench.dataset import build_database, copy_database, mint_grants, retime
from bench.lab import BenchSettings, Lab, wait_committed
from bench.procs import load_average
from bench.report import DOC, machine, write_block

# (part, path fragments of the functions in it), first match wins; C functions
# (cProfile's "~") are sorted by name below.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Intuit client and its parser (intuit/)", ("qbo_daemon/intuit/",)),
    ("engine: scheduler, refresher, state (engine/)", ("qbo_daemon/engine/",)),
    ("storage: row mapper, group commit, crypto (store/)", ("qbo_daemon/store/",)),
    ("log pipeline (runtime/logs.py, structlog, logging)", ("runtime/logs.py", "structlog/")),
    ("log pipeline (runtime/logs.py, structlog, logging)", ("/logging/",)),
    ("metrics (core/metrics.py, prometheus_client)", ("core/metrics.py", "prometheus_client/")),
    ("core: models, clock (core/)", ("qbo_daemon/core/",)),
    ("aiohttp client (aiohttp, multidict, yarl)", ("aiohttp/", "multidict/", "yarl/")),
    ("asyncio event loop", ("/asyncio/", "/selectors.py")),
    ("storage: aiosqlite hand-offs", ("aiosqlite/",)),
)
SOCKETS = "socket and epoll calls (epoll: also idle waits)"
OTHER_C = "other C built-ins (str, dict, json, AES-GCM, ...)"
OTHER_PY = "other standard library (json, dataclasses, ...)"


def part_of(path: str, name: str) -> str:
    if path == "~":
        return SOCKETS if ("socket" in name or "epoll" in name) else OTHER_C
    for part, fragments in PARTS:
        if any(fragment in path for fragment in fragments):
            return part
    return OTHER_PY


def summarize(stats_path: Path, refreshes: int, top: int = 12) -> dict[str, object]:
    """Own time by part and the top functions, as shares of the profiled thread's time."""
    raw = pstats.Stats(str(stats_path)).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values()) or 1.0
    parts: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    calls = 0
    for (path, line, name), (_, ncalls, own, _, _) in raw.items():
        parts[part_of(path, name)] += own
        where = path if path == "~" else f"{_short(path)}:{line}"
        functions[f"{name} ({where})"] += own
        calls += ncalls
    return {
        "refreshes": refreshes,
        "calls_per_refresh": calls / max(refreshes, 1),
        "parts": [(part, own / total) for part, own in parts.most_common()],
        "functions": [(name, own / total) for name, own in functions.most_common(top)],
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "qbo_daemon/", "bench/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return Path(path).name


def render(summary: dict[str, object], context: str) -> str:
    lines = [context, "", "```", f"{'part of the program':<56} own time"]
    for part, share in summary["parts"]:  # type: ignore[attr-defined]
        lines.append(f"{part:<56} {share * 100:6.1f} %")
    lines += ["", f"{'function (own time, its callees excluded)':<72} share"]
    for name, share in summary["functions"]:  # type: ignore[attr-defined]
        lines.append(f"{name[:72]:<72} {share * 100:5.1f} %")
    lines.append(f"\nPython and C calls per refresh: {summary['calls_per_refresh']:.0f}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def write_docs(text: str, doc: Path = DOC) -> None:
    write_block("profile", text, doc)


async def profile(
    accounts: int, overdue: int, concurrency: int, workdir: Path
) -> dict[str, object]:
    settings = BenchSettings(accounts=accounts, overdue=overdue)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        lab = await Lab.start_simulator(settings, workdir, session)
        try:
            lab.grants = await mint_grants(session, lab.sim_url, accounts)
            await build_database(lab.base_db, lab.key, lab.grants)
            database = workdir / "profile.sqlite3"
            copy_database(lab.base_db, database)
            due = datetime.now(UTC) - timedelta(minutes=1)
            retime(database, {g.account_id: due for g in lab.grants[:overdue]})
            await lab.set_latency(0.0)
            await lab.reset_simulator()
            load_before = load_average()
            stats_path = workdir / "daemon.pstats"
            run = await lab.launch_daemon("profile", database, concurrency, profile=stats_path)
            try:
                await wait_committed(
                    database, overdue, run.child, timeout=60 + overdue * 0.05, poll=0.05
                )
            finally:
                await run.stop()
            refreshes = overdue - run.marks["committed_at_ready"]
        finally:
            await lab.simulator.stop()
    summary = summarize(stats_path, refreshes)
    summary["load_average_before"] = load_before
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=20_000)
    p.add_argument("--overdue", type=int, default=8_000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--write-docs", action="store_true", help="put the table in performance.md")
    args = p.parse_args(argv)
    if not 1 <= args.overdue <= args.accounts:
        p.error("--overdue must be between 1 and --accounts")
    workdir = Path(tempfile.mkdtemp(prefix="qbo-profile-"))
    try:
        summary = asyncio.run(profile(args.accounts, args.overdue, args.concurrency, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    m = machine()
    load = " ".join(f"{v:.2f}" for v in summary["load_average_before"])  # type: ignore[attr-defined]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    context = (
        f"Written by `python -m bench.profile --write-docs`, {when}: "
        f"{args.accounts:,} accounts, {args.overdue:,} overdue, concurrency {args.concurrency}, "
        f"latency 0; the event loop's thread under cProfile from readiness to the last "
        f"commit; {m['cores']} cores ({m['cpu']}), Python {m['python']}, load average "
        f"before {load}."
    )
    text = render(summary, context)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
