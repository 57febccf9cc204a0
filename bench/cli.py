"""``python -m bench``: the whole benchmark in one command.

Starts the simulator in its own process, builds a database of ``--accounts``
real simulator grants through the storage layer, then measures, each time with
the real daemon in a process of its own: start-up, memory and lateness with
every account scheduled; catch-up storms at each latency and concurrency next
to a bare aiohttp client (the ceiling; at 0 ms also held to the daemon's rate,
and the floor, ``bench.floor``); and the cron batch. Prints a table and
writes everything to ``bench/results/<time>-n<accounts>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import cluster
from bench.dataset import build_database, mint_grants
from bench.lab import BenchSettings, Lab, available_loops
from bench.phases import ceiling, ceiling_at_rate, cron, floor, startup_and_lateness, storm
from bench.procs import load_average
from bench.report import DOC, goals, machine, measured_block, table, write_block

RESULTS = Path(__file__).parent / "results"
PHASES = ("lateness", "storms", "cron")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = BenchSettings()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=d.accounts, help="accounts in the database")
    p.add_argument("--overdue", type=int, default=d.overdue, help="accounts overdue in a storm")
    p.add_argument(
        "--slow-overdue",
        type=int,
        default=None,
        help="accounts overdue in the storms with latency (default: --overdue)",
    )
    p.add_argument("--due-soon", type=int, default=d.due_soon, help="due during the lateness run")
    p.add_argument(
        "--lateness-delay",
        type=float,
        default=d.lateness_delay,
        metavar="S",
        help="seconds from the daemon's launch to the first due account",
    )
    p.add_argument(
        "--lateness-window",
        type=float,
        default=d.lateness_window,
        metavar="S",
        help="seconds over which the due accounts are spread",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(d.concurrencies),
        help="storm concurrencies",
    )
    p.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=list(d.latencies),
        help="simulator latencies, seconds",
    )
    p.add_argument(
        "--cron-seconds", type=float, default=d.cron_seconds, help="length of each cron batch"
    )
    p.add_argument(
        "--cron-workers",
        type=int,
        nargs="+",
        default=list(d.cron_workers),
        help="threads of the cron batch (1: the classic job)",
    )
    p.add_argument(
        "--loops",
        choices=("asyncio", "uvloop"),
        nargs="+",
        default=list(available_loops()),
        help="event loops the 0 ms storms run on (default: every one installed)",
    )
    p.add_argument(
        "--only", choices=PHASES, nargs="+", default=list(PHASES), help="run only these phases"
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="a PostgreSQL server (postgresql://…): run the several-daemon phases there "
        "(bench/cluster.py), each on a database of its own",
    )
    p.add_argument("--nodes", type=int, default=1, help="daemons sharing the database")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="update docs/performance.md (the storms block; with --storage, the PostgreSQL ones)",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    p.add_argument("--workdir", type=Path, default=None, help="keep databases and logs here")
    p.add_argument("--docs", type=Path, default=DOC, help=argparse.SUPPRESS)  # tests write a copy
    args = p.parse_args(argv)
    for name in ("overdue", "due_soon"):
        if not 1 <= getattr(args, name) <= args.accounts:
            p.error(f"--{name.replace('_', '-')} must be between 1 and --accounts")
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    if args.storage is not None and not args.storage.startswith(("postgresql://", "postgres://")):
        p.error("--storage must be a postgresql:// URL")
    if args.slow_overdue is not None and not 1 <= args.slow_overdue <= args.accounts:
        p.error("--slow-overdue must be between 1 and --accounts")
    return args


def settings_from(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        accounts=args.accounts,
        overdue=args.overdue,
        slow_overdue=args.slow_overdue,
        due_soon=args.due_soon,
        lateness_delay=args.lateness_delay,
        lateness_window=args.lateness_window,
        concurrencies=tuple(args.concurrency),
        latencies=tuple(args.latency),
        cron_seconds=args.cron_seconds,
        cron_workers=tuple(args.cron_workers),
        loops=tuple(args.loops),
    )


async def run(settings: BenchSettings, workdir: Path, phases: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "settings": asdict(settings),
        "load_average_start": load_average(),
        "storms": [],
        "ceilings": [],
        "ceilings_at_rate": [],
        "floors": [],
        "crons": [],
    }
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        lab = await Lab.start_simulator(settings, workdir, session)
        try:
            started = time.monotonic()
            lab.grants = await mint_grants(session, lab.sim_url, settings.accounts)
            minted = time.monotonic()
            await build_database(lab.base_db, lab.key, lab.grants)
            results["build"] = {
                "accounts": settings.accounts,
                "grants_s": minted - started,
                "store_s": time.monotonic() - minted,
            }
            _progress(f"database of {settings.accounts} accounts built")
            if "lateness" in phases:
                results["lateness_phase"] = await startup_and_lateness(lab)
                _progress("start-up and lateness measured")
            for latency in settings.latencies:
                count = settings.overdue
                if latency > 0 and settings.slow_overdue is not None:
                    count = settings.slow_overdue
                if "storms" in phases:
                    # Our overhead shows at 0 ms, so that is where the loops are compared.
                    loops = settings.loops if latency == 0 else settings.loops[:1]
                    for concurrency in settings.concurrencies:
                        daemons = []
                        for loop in loops:
                            daemons.append(await storm(lab, latency, concurrency, count, loop))
                            _progress(
                                f"storm at {latency * 1000:g} ms, concurrency {concurrency}, {loop}"
                            )
                        results["storms"].extend(daemons)
                        bare = await ceiling(lab, latency, concurrency, count)
                        results["ceilings"].append(bare)
                        if latency == 0:
                            # The bare client again, held to the first loop's storm rate:
                            # the same work per request, at the daemon's load.
                            paced = await ceiling_at_rate(lab, concurrency, count, daemons[0], bare)
                            if paced is not None:
                                results["ceilings_at_rate"].append(paced)
                            # Our overhead shows at 0 ms: the least any design must spend
                            # there, and that least without its read, then its log line too.
                            for without in FLOOR_VARIANTS:
                                results["floors"].append(
                                    await floor(lab, latency, concurrency, count, without)
                                )
                if "cron" in phases:
                    for workers in settings.cron_workers:
                        results["crons"].append(await cron(lab, latency, count, workers))
                        _progress(f"cron at {latency * 1000:g} ms, {workers} worker(s)")
        finally:
            await lab.simulator.stop()
    results["load_average_end"] = load_average()
    results["goals"] = goals(results)
    return results


FLOOR_VARIANTS: tuple[tuple[str, ...], ...] = ((), ("read",), ("read", "log"))


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if args.storage is not None:
        return cluster.main(args, settings, sys.argv[1:] if argv is None else argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qbo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = asyncio.run(run(settings, workdir, args.only))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    # What measured these figures, for whoever writes them into the docs later
    # (python -m bench.report RESULTS.json --write-docs).
    results["command"] = _command(argv)
    out: Path = args.out or RESULTS / (
        f"{datetime.now(UTC):%Y%m%d-%H%M%S}-n{settings.accounts}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\nresults: {out}")
    if args.write_docs:
        # The SQLite storms (and the floor beside them) as this run measured them.
        write_block(
            "storms", measured_block(f"{results['command']} --write-docs", results), args.docs
        )
    return 0


def _command(argv: list[str] | None) -> str:
    """This run's command, without the options that only say where its files go
    (or whether the docs are written)."""
    words = iter(sys.argv[1:] if argv is None else argv)
    kept = []
    for word in words:
        if word in ("--out", "--workdir", "--docs"):
            next(words, None)  # its value
        elif not word.startswith(("--out=", "--workdir=", "--docs=", "--write-docs")):
            kept.append(word)
    return " ".join(["python -m bench", *kept])
