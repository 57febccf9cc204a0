"""A real daemon, in this process, against a real simulator, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.config.load import Config, load_config
from qbo_daemon.core.clock import Clock
from qbo_daemon.core.models import parse_iso
from qbo_daemon.engine.services import Services
from qbo_daemon.runtime.daemon import Daemon
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import generate_key
from qbo_daemon.store.port import Attempt


@dataclass
class InProcessDaemon:
    """A daemon running in this process, whatever Intuit stand-in its config names."""

    daemon: Daemon
    config: Config
    config_path: Path
    api_key: str
    encryption_key: str
    stop: asyncio.Event
    task: asyncio.Task[None]
    session: aiohttp.ClientSession = field(repr=False)

    @property
    def api_url(self) -> str:
        return self.config.api.url

    @property
    def callback_url(self) -> str:
        callback = self.config.callback
        return f"http://{callback.host}:{callback.port}{callback.path}"

    @property
    def services(self) -> Services:
        assert self.daemon.services is not None
        return self.daemon.services

    @property
    def database(self) -> Path:
        return self.config.storage.path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def api(
        self, method: str, path: str, *, json: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """Call the token API with the key; returns (status, parsed JSON or text)."""
        async with self.session.request(
            method, self.api_url + path, json=json, headers=headers or self.headers
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def connect(self, account_id: str) -> int:
        """The whole connect flow as a browser does it; returns the callback page's status."""
        status, body = await self.api("POST", f"/v1/accounts/{account_id}/authorize-url")
        assert status == 200, body
        async with aiohttp.ClientSession() as browser, browser.get(body["url"]) as page:
            return page.status

    async def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.session.close()


@dataclass
class RunningDaemon(InProcessDaemon):
    """An in-process daemon against the simulator (``simulator_config_text``)."""

    simulator: IntuitSimulator

    async def connect(self, account_id: str) -> int:
        """As a browser does it; a reconnect picks the company the account already has,
        as a user would."""
        existing = await self.services.storage.find(account_id)
        if existing is not None and existing.realm_id is not None:
            self.simulator.choose_realm(existing.realm_id)
        return await super().connect(account_id)


async def start_daemon(
    simulator: IntuitSimulator,
    data_dir: Path,
    *,
    clock: Clock | None = None,
    api_key: str | None = None,
    encryption_key: str | None = None,
    storage_url: str | None = None,
    environ: Mapping[str, str] | None = None,
    **settings: str,
) -> RunningDaemon:
    """Start a daemon on free loopback ports; ``settings`` go to ``simulator_config_text``.

    With ``storage_url`` (PostgreSQL) it stores there, not in a file of ``data_dir``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    api_key = api_key or "test-api-key-" + generate_key()[:16]
    encryption_key = encryption_key or generate_key()
    text = simulator_config_text(
        simulator,
        data_dir=data_dir,
        api_port=free_port(),
        callback_port=free_port(),
        api_key=api_key,
        encryption_key=encryption_key,
        **settings,
    )
    if storage_url is not None:
        text = text.replace("[storage]\n", f'[storage]\nurl = "{storage_url}"\n')
    config_path = data_dir / "config.toml"
    config_path.write_text(text, encoding="utf-8")
    return await run_daemon(
        config_path,
        simulator,
        api_key=api_key,
        encryption_key=encryption_key,
        clock=clock,
        environ=environ,
    )


async def run_daemon(
    config_path: Path,
    simulator: IntuitSimulator,
    *,
    api_key: str,
    encryption_key: str,
    clock: Clock | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunningDaemon:
    """Start a daemon on an existing config file (a first start or a restart)."""
    daemon, config, stop, task = await launch_daemon(config_path, clock=clock, environ=environ)
    return RunningDaemon(
        daemon=daemon,
        config=config,
        config_path=config_path,
        simulator=simulator,
        api_key=api_key,
        encryption_key=encryption_key,
        stop=stop,
        task=task,
        session=aiohttp.ClientSession(),
    )


async def launch_daemon(
    config_path: Path, *, clock: Clock | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Daemon, Config, asyncio.Event, asyncio.Task[None]]:
    """Run a daemon on ``config_path`` until it is ready: (daemon, config, stop, task)."""
    config = load_config(config_path, {})
    daemon = Daemon(config, clock=clock, environ=environ or {})
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if not daemon.ready.is_set():
        ready.cancel()
        await task  # raises the start-up error
        raise AssertionError("the daemon did not become ready")
    return daemon, config, stop, task


async def next_refresh(services: Services, account_id: str) -> datetime | None:
    """When ``account_id`` is refreshed next: its timer, or beyond the timers' window the
    due time in its row (the window brings it back): what the API shows."""
    account = await services.storage.find(account_id)
    return None if account is None else services.scheduler.next_refresh(account)


async def wait_for(predicate: Any, *, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` (sync or async) in real time until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def attempts(database: Path, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
    """The refresh attempts in the database, newest first, as an operator would read them."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT account_id, started_at, outcome, duration_ms, intuit_tid, error "
            "FROM refresh_attempts WHERE ? IS NULL OR account_id = ? ORDER BY id DESC LIMIT ?",
            (account_id, account_id, limit),
        ).fetchall()
    found = []
    for account_id_, started_at, outcome, duration_ms, intuit_tid, error in rows:
        started = parse_iso(started_at)
        assert started is not None
        found.append(Attempt(account_id_, started, outcome, duration_ms, intuit_tid, error))
    return found
