"""The real daemon in a process of its own, with start-up marks for the benchmark.

``python -m bench.daemon_proc --config PATH --log PATH --marks PATH --t0 WALL``
runs :class:`qbo_daemon.runtime.daemon.Daemon` as ``qbo-daemon run`` does (its
configuration, its logging, SIGTERM/SIGINT to stop; ``--loop`` picks the event
loop) and, once the daemon is
ready, writes one JSON file of marks: the wall time and this process's CPU
seconds at readiness, peak and current RSS, and how many
refreshes were already committed. ``--t0`` is the launcher's wall clock just
before it started this process, so start-up times count interpreter start and
imports too. With ``--profile PATH`` the event loop's thread is profiled
(cProfile) from readiness to the stop, and the statistics are written to PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from bench.procs import memory_kib
from qbo_daemon.config.load import Config, load_config
from qbo_daemon.runtime.daemon import Daemon
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.runtime.loop import loop_factory


def committed_attempts(database: Path) -> int:
    """Refresh attempts committed so far (ids only grow)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT COALESCE(MAX(id), 0) FROM refresh_attempts").fetchone()
    return int(row[0])


async def _committed(config: Config) -> int:
    if config.storage.url is None:
        return committed_attempts(config.storage.path)
    from bench import pg  # only on PostgreSQL (bench/cluster.py): SQLite runs import as before

    return await pg.committed(config.storage.url.reveal())


async def run(
    config_path: Path,
    log_path: Path,
    marks_path: Path,
    t0: float,
    profiler: cProfile.Profile | None = None,
) -> None:
    imported = time.time()
    config = load_config(config_path, {})
    with log_path.open("a", encoding="utf-8") as log_file:
        configure_logging(config.log.format, config.log.level, stream=log_file)
        daemon = Daemon(config, environ={})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        running = asyncio.create_task(daemon.run(stop), name="daemon")
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            marks = {
                "t0": t0,
                "imported": imported,
                "ready_wall": time.time(),
                "ready_cpu": time.process_time(),
                "memory_kib": memory_kib(os.getpid()),
                "committed_at_ready": await _committed(config),
            }
            partial = marks_path.with_name(marks_path.name + ".tmp")
            partial.write_text(json.dumps(marks), encoding="utf-8")
            if profiler is not None:
                profiler.enable()
            partial.replace(marks_path)
        else:
            ready.cancel()
        await running


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon_proc")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--marks", type=Path, required=True)
    parser.add_argument("--t0", type=float, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    _, factory = loop_factory(args.loop)
    profiler = cProfile.Profile() if args.profile else None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run(args.config, args.log, args.marks, args.t0, profiler))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
