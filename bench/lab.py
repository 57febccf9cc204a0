"""The bench's fixtures: the simulator process, the base database, daemon launches.

A :class:`Lab` owns one simulator process (``qbo-daemon simulator``) for the
whole run and the base database of N accounts; :meth:`Lab.launch_daemon`
starts the real daemon on a copy, in its own process, and waits until it is
ready. Every wait is bounded and every child is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.dataset import Grant
from bench.procs import Child, CpuMark, free_port, wait_for_port
from qbo_daemon.store.crypto import generate_key

# The simulator's stand-in credentials (its defaults): never a real secret.
CLIENT_ID = "sim-client-id"
CLIENT_SECRET = "sim-client-secret"


def available_loops() -> tuple[str, ...]:
    """asyncio's loop, and uvloop's where it is installed."""
    return ("asyncio", "uvloop") if importlib.util.find_spec("uvloop") else ("asyncio",)


@dataclass(frozen=True)
class BenchSettings:
    accounts: int = 100_000
    overdue: int = 20_000
    slow_overdue: int | None = None  # storm size with latency; None: same as overdue
    due_soon: int = 3_000
    lateness_delay: float = 8.0
    lateness_window: float = 20.0
    lateness_concurrency: int = 8
    concurrencies: tuple[int, ...] = (8, 64)
    latencies: tuple[float, ...] = (0.0, 0.1)
    cron_seconds: float = 20.0
    cron_workers: tuple[int, ...] = (1, 8)  # threads of the cron batch; 1 is the classic job
    loops: tuple[str, ...] = ("asyncio",)  # event loops the latency-0 storms run on
    poll: float = 0.02  # how often the bench looks for the end of a phase


@dataclass
class DaemonRun:
    """A daemon process started on one database, and its start-up marks."""

    child: Child
    database: Path
    log: Path
    marks: dict[str, Any]

    def mark(self) -> CpuMark:
        return self.child.mark()

    def scheduler_started(self) -> tuple[float, int] | None:
        """The ``scheduler.started`` log line (every account in the heap): its wall time
        and how many accounts it scheduled."""
        with self.log.open(encoding="utf-8") as lines:
            for line in lines:
                if '"scheduler.started"' in line:
                    event = json.loads(line)
                    stamp = datetime.fromisoformat(event["timestamp"]).timestamp()
                    return stamp, int(event["scheduled"])
        return None

    async def stop(self) -> int | None:
        return await self.child.stop()


@dataclass
class Lab:
    settings: BenchSettings
    workdir: Path
    session: aiohttp.ClientSession
    simulator: Child
    sim_url: str
    key_file: Path
    base_db: Path
    grants: list[Grant] = field(default_factory=list)

    @classmethod
    async def start_simulator(
        cls, settings: BenchSettings, workdir: Path, session: aiohttp.ClientSession
    ) -> Lab:
        port = free_port()
        simulator = Child(
            "qbo_daemon", ["simulator", "--port", str(port)], log=workdir / "simulator.log"
        )
        await simulator.start()
        try:
            await wait_for_port(port, simulator)
        except BaseException:
            await simulator.stop()
            raise
        key_file = workdir / "bench.key"
        key_file.write_text(generate_key() + "\n", encoding="utf-8")
        key_file.chmod(0o600)
        return cls(
            settings=settings,
            workdir=workdir,
            session=session,
            simulator=simulator,
            sim_url=f"http://127.0.0.1:{port}",
            key_file=key_file,
            base_db=workdir / "base.sqlite3",
        )

    @property
    def key(self) -> str:
        return self.key_file.read_text(encoding="utf-8").strip()

    @property
    def token_url(self) -> str:
        return f"{self.sim_url}/oauth2/v1/tokens/bearer"

    # -- the simulator's control API --------------------------------------------

    async def sim(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, f"{self.sim_url}/_sim/{path}", json=body) as r:
            r.raise_for_status()
            return await r.json()

    async def set_latency(self, seconds: float) -> None:
        await self.sim("POST", "settings", {"latency": seconds})

    async def reset_simulator(self) -> None:
        """Empty its request log and counters (keeps the grants): the log stays small."""
        await self.sim("POST", "reset")

    # -- daemons -----------------------------------------------------------------

    async def launch_daemon(
        self,
        name: str,
        database: Path,
        concurrency: int,
        loop: str = "asyncio",
        *,
        edit_config: Callable[[str], str] | None = None,
        profile: Path | None = None,
    ) -> DaemonRun:
        """Start the real daemon on ``database``; return once it is ready (bounded).

        ``edit_config`` rewrites the configuration file's text (bench/cluster.py puts
        a PostgreSQL ``url`` and a ``[cluster]`` table in it). With ``profile``, its
        event loop is profiled from readiness on (cProfile statistics written there
        when it stops).
        """
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        config = home / "config.toml"
        text = self._config_text(database, concurrency)
        if edit_config is not None:
            text = edit_config(text)
        config.write_text(text, encoding="utf-8")
        config.chmod(0o600)
        marks_path, log = home / "marks.json", home / "daemon.log"
        marks_path.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        args = ["--config", str(config), "--log", str(log), "--marks", str(marks_path)]
        args += ["--loop", loop]
        if profile is not None:
            args += ["--profile", str(profile)]
        child = Child("bench.daemon_proc", [*args, "--t0", repr(time.time())], log=home / "out")
        await child.start()
        deadline = time.monotonic() + 120
        try:
            while not marks_path.exists():
                child.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the daemon {name} was not ready within 120 s")
                await asyncio.sleep(0.01)
        except BaseException:
            await child.stop()
            raise
        marks = json.loads(marks_path.read_text(encoding="utf-8"))
        return DaemonRun(child=child, database=database, log=log, marks=marks)

    def _config_text(self, database: Path, concurrency: int) -> str:
        api_port, callback_port = free_port(), free_port()
        return f"""\
[intuit]
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
redirect_uri = "http://127.0.0.1:{callback_port}/accounts/oauth2_callback"
authorization_endpoint = "{self.sim_url}/connect/oauth2"
token_endpoint = "{self.token_url}"
revocation_endpoint = "{self.sim_url}/v2/oauth2/tokens/revoke"
timeout = "30s"

[callback]
listen = "127.0.0.1:{callback_port}"

[api]
listen = "127.0.0.1:{api_port}"
keys = ["{secrets.token_urlsafe(24)}"]

[storage]
path = "{database}"
key_file = "{self.key_file}"

[refresh]
lead = "10m"
concurrency = {concurrency}
shutdown_grace = "10s"

[log]
format = "json"
level = "info"
"""


async def wait_committed(
    database: Path, count: int, child: Child, *, timeout: float, poll: float
) -> float:
    """Poll until ``count`` refresh attempts are committed; return that wall time.

    Attempts are written in the same transaction as the tokens they produced,
    so a committed attempt is a durable refresh.
    """
    deadline = time.monotonic() + timeout
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        while True:
            (committed,) = db.execute(
                "SELECT COALESCE(MAX(id), 0) FROM refresh_attempts"
            ).fetchone()
            if committed >= count:
                return time.time()
            child.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{committed} of {count} refreshes after {timeout:.0f}s")
            await asyncio.sleep(poll)
