"""``qbo-daemon run`` as a process: SIGHUP reload, SIGTERM, one daemon per database.

The daemon runs as a real subprocess (``python -m qbo_daemon run --config``)
against the simulator in this process; its JSON log lines are read from its
stderr and its readiness from a notify socket the test binds, as systemd would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.config.load import load_config
from qbo_daemon.core.errors import MissingKeyError
from qbo_daemon.core.models import parse_iso
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.crypto import generate_key
from tests.conftest import StartDaemon

# Generous: a subprocess starting Python on a loaded 2-core machine.
START_TIMEOUT = 30.0
EVENT_TIMEOUT = 15.0
LogLine = dict[str, Any]


class DaemonProcess:
    """One ``qbo-daemon run`` subprocess, its log lines and its notifications."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.lines: list[LogLine] = []
        self.raw: list[str] = []
        self.notify_name = f"qbo-daemon-reload-{uuid.uuid4().hex}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind("\0" + self.notify_name)
        self.notify.setblocking(False)
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QBO_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
        }
        env["NOTIFY_SOCKET"] = "@" + self.notify_name
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "qbo_daemon",
            "run",
            "--config",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())

    async def ready(self) -> str:
        """Wait for READY=1 on the notify socket (or the process dying first)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                receive = asyncio.ensure_future(loop.sock_recv(self.notify, 4096))
                exited = asyncio.ensure_future(self.wait())
                done, _ = await asyncio.wait({receive, exited}, return_when="FIRST_COMPLETED")
                if exited in done:
                    receive.cancel()
                    raise AssertionError(f"the daemon exited: {self.raw}")
                exited.cancel()
                message = receive.result().decode()
                if message.startswith("READY=1"):
                    return message

    async def wait(self) -> int:
        assert self.process is not None
        rc = await self.process.wait()
        if self._reader is not None:
            await self._reader  # every line read
        return rc

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def event(self, name: str, **fields: Any) -> LogLine:
        """The first log line with event ``name`` (and ``fields``), waiting for it."""
        async with asyncio.timeout(EVENT_TIMEOUT):
            while True:
                for line in self.lines:
                    if line.get("event") == name and all(
                        line.get(k) == v for k, v in fields.items()
                    ):
                        return line
                self._changed.clear()
                await self._changed.wait()

    def index(self, line: LogLine) -> int:
        return next(i for i, item in enumerate(self.lines) if item is line)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.notify.close()

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if isinstance(line, dict):
                    self.lines.append(line)
            self._changed.set()
        self._changed.set()


class Setup:
    """Writes configuration files for one database, as an operator edits them."""

    def __init__(self, simulator: IntuitSimulator, data_dir: Path) -> None:
        self.simulator = simulator
        self.data_dir = data_dir
        self.path = data_dir / "qbo-daemon.toml"
        self.encryption_key = generate_key()
        self.api_port = free_port()
        self.callback_port = free_port()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def database(self) -> Path:
        return self.data_dir / "qbo-daemon.sqlite3"

    def text(self, *, api_key: str, level: str, api_port: int | None = None) -> str:
        return simulator_config_text(
            self.simulator,
            data_dir=self.data_dir,
            api_port=api_port or self.api_port,
            callback_port=self.callback_port if api_port is None else free_port(),
            api_key=api_key,
            encryption_key=self.encryption_key,
            log_level=level,
        )

    def write(self, text: str, path: Path | None = None) -> Path:
        path = path or self.path
        path.write_text(text, encoding="utf-8")
        path.chmod(0o600)  # it holds secrets: readable by others, run would warn
        return path


@pytest.fixture
async def processes() -> AsyncIterator[Callable[[Path], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(config_path: Path) -> DaemonProcess:
        process = DaemonProcess(config_path)
        started.append(process)
        return process

    yield make
    for process in started:
        await process.close()


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    key: str,
    body: Any = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def refreshed(http: aiohttp.ClientSession, url: str, key: str) -> None:
    """Wait until the account's first refresh is done and its next one scheduled."""
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            status, account = await call(http, "GET", url, key)
            assert status == 200
            done, due = account["last_refreshed_at"], account["next_refresh_at"]
            if done and due and due > done:
                return
            await asyncio.sleep(0.02)


def import_body(simulator: IntuitSimulator) -> dict[str, str]:
    grant = simulator.grant()
    return {"refresh_token": grant["refresh_token"], "realm_id": grant["realm_id"]}


async def test_sighup_reloads_log_level_and_api_keys_and_sigterm_stops(
    simulator: IntuitSimulator,
    tmp_path: Path,
    processes: Callable[[Path], DaemonProcess],
) -> None:
    setup = Setup(simulator, tmp_path)
    old_key, new_key = "old-key-" + uuid.uuid4().hex, "new-key-" + uuid.uuid4().hex
    setup.write(setup.text(api_key=old_key, level="warning"))
    daemon = processes(setup.path)
    await daemon.start()
    await daemon.ready()
    accounts = setup.api_url + "/v1/accounts"

    async with aiohttp.ClientSession() as http:
        # At "warning", importing an account logs nothing: no info, no debug line.
        status, _ = await call(
            http, "PUT", accounts + "/early/tokens", old_key, import_body(simulator)
        )
        assert status == 201
        await refreshed(http, accounts + "/early", old_key)

        # A broken file: the reload fails loudly and changes nothing.
        setup.write('[log]\nlevel = "debug"\nlevle = "oops"\n')
        daemon.send(signal.SIGHUP)
        failed = await daemon.event("daemon.reload_failed")
        assert failed["level"] == "error"
        assert str(setup.path) in failed["error"]
        assert "levle" in failed["error"]
        assert (await call(http, "GET", accounts, old_key))[0] == 200

        # The fixed file: debug logs, and the API key is replaced.
        setup.write(setup.text(api_key=new_key, level="debug"))
        daemon.send(signal.SIGHUP)
        reloaded = await daemon.event("daemon.reloaded")
        assert reloaded["log_level"] == "debug"
        assert reloaded["api_key_count"] == 1
        assert reloaded["restart_needed"] is None
        assert (await call(http, "GET", accounts, new_key))[0] == 200
        status, body = await call(http, "GET", accounts, old_key)
        assert (status, body["error"]) == (401, "unauthorized")

    # A new connection: aiohttp decides per connection whether to write access lines.
    async with aiohttp.ClientSession() as http:
        status, _ = await call(
            http, "PUT", accounts + "/late/tokens", new_key, import_body(simulator)
        )
        assert status == 201
        scheduled = await daemon.event("refresh.scheduled", account_id="late")
        assert scheduled["level"] == "debug"
        await daemon.event("refresh.succeeded", account_id="late")
        await daemon.event("http.request_served", path="/v1/accounts/late/tokens")

    before = daemon.lines[: daemon.index(reloaded)]
    # A warning that a new database was made, then the failed reload: nothing else.
    assert [line["event"] for line in before] == [
        "storage.database_created",
        "daemon.reload_failed",
    ]
    assert not [line for line in daemon.lines if line.get("account_id") == "early"]
    assert not any(line.get("event") == "daemon.started" for line in daemon.lines)

    daemon.send(signal.SIGTERM)
    async with asyncio.timeout(START_TIMEOUT):
        assert await daemon.wait() == 0
    assert daemon.lines[-1]["event"] == "daemon.stopped"
    assert not [text for text in daemon.raw if "Traceback" in text]
    for secret in (old_key, new_key, setup.encryption_key, simulator.settings.client_secret):
        assert not [text for text in daemon.raw if secret in text]


async def test_second_daemon_on_the_same_database_exits_with_one_clear_line(
    simulator: IntuitSimulator,
    tmp_path: Path,
    processes: Callable[[Path], DaemonProcess],
) -> None:
    setup = Setup(simulator, tmp_path)
    first = processes(setup.write(setup.text(api_key="k1-" + uuid.uuid4().hex, level="info")))
    await first.start()
    await first.ready()

    other = setup.write(
        setup.text(api_key="k2-" + uuid.uuid4().hex, level="info", api_port=free_port()),
        tmp_path / "second.toml",
    )
    second = processes(other)
    await second.start()
    async with asyncio.timeout(START_TIMEOUT):
        rc = await second.wait()
    assert rc == 1
    errors = [text for text in second.raw if text.startswith("qbo-daemon: error:")]
    assert len(errors) == 1, second.raw
    assert str(setup.database) in errors[0]
    assert "already running" in errors[0]
    assert not [text for text in second.raw if "Traceback" in text]

    # The first one never noticed.
    async with aiohttp.ClientSession() as http, http.get(setup.api_url + "/healthz") as response:
        assert response.status == 200
    first.send(signal.SIGTERM)
    async with asyncio.timeout(START_TIMEOUT):
        assert await first.wait() == 0


# -- reload of the encryption keys (in process: the same code path SIGHUP takes) ----


async def test_reload_refuses_keys_that_cannot_read_the_database(
    daemon_factory: StartDaemon,
) -> None:
    running = await daemon_factory()
    assert await running.connect("acme") == 200
    text = running.config_path.read_text(encoding="utf-8")
    old_key, new_key = running.encryption_key, generate_key()

    def config_with(keys: list[str]) -> Any:
        listed = ", ".join(f'"{k}"' for k in keys)
        running.config_path.write_text(
            text.replace(f'encryption_keys = ["{old_key}"]', f"encryption_keys = [{listed}]"),
            encoding="utf-8",
        )
        return load_config(running.config_path, {})

    # Only a new key: the stored rows would become unreadable. Refused; nothing changes.
    with pytest.raises(MissingKeyError):
        await running.daemon.reload(config_with([new_key]))
    assert (await running.api("POST", "/v1/accounts/acme/refresh"))[0] == 200
    status, token = await running.api("GET", "/v1/accounts/acme/token")
    assert status == 200
    assert running.simulator.is_access_token_valid(token["access_token"])

    # Rotation: the new key first, the old one still listed. Accepted.
    await running.daemon.reload(config_with([new_key, old_key]))
    assert (await running.api("POST", "/v1/accounts/acme/refresh"))[0] == 200
    assert (await running.api("GET", "/v1/accounts/acme/token"))[0] == 200


async def test_reload_names_what_needs_a_restart(
    daemon_factory: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await daemon_factory()
    text = running.config_path.read_text(encoding="utf-8")
    old_listen = f'listen = "127.0.0.1:{running.config.api.port}"'
    assert old_listen in text
    running.config_path.write_text(
        text.replace(old_listen, f'listen = "127.0.0.1:{free_port()}"').replace(
            'shutdown_grace = "12s"', 'shutdown_grace = "7s"\nconcurrency = 2'
        ),
        encoding="utf-8",
    )
    capsys.readouterr()
    await running.daemon.reload(load_config(running.config_path, {}))  # logs to stderr, as JSON
    [reloaded] = [
        line
        for line in map(json.loads, capsys.readouterr().err.splitlines())
        if line["event"] == "daemon.reloaded"
    ]
    assert reloaded["restart_needed"] == ["[api] listen", "[refresh] shutdown_grace"]
    # Still served where it was.
    assert (await running.api("GET", "/v1/accounts"))[0] == 200


async def test_reload_applies_a_new_lead_to_the_next_decision(
    daemon_factory: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await daemon_factory()
    assert await running.connect("before") == 200
    _, before = await running.api("GET", "/v1/accounts/before")
    expires, due = parse_iso(before["token_expires_at"]), parse_iso(before["next_refresh_at"])
    assert expires is not None
    assert due is not None
    assert expires - due == timedelta(minutes=10)

    text = running.config_path.read_text(encoding="utf-8")
    assert 'lead = "10m"' in text
    running.config_path.write_text(text.replace('lead = "10m"', 'lead = "25m"'), encoding="utf-8")
    capsys.readouterr()
    await running.daemon.reload(load_config(running.config_path, {}))
    [reloaded] = [
        line
        for line in map(json.loads, capsys.readouterr().err.splitlines())
        if line["event"] == "daemon.reloaded"
    ]
    assert reloaded["restart_needed"] is None

    # A new connection, and the next refresh of the old one, are timed by the new lead.
    assert await running.connect("after") == 200
    status, refreshed = await running.api("POST", "/v1/accounts/before/refresh")
    assert status == 200
    for account_id, shown in (("after", None), ("before", refreshed)):
        if shown is None:
            _, shown = await running.api("GET", f"/v1/accounts/{account_id}")
        expires = parse_iso(shown["token_expires_at"])
        for name in ("reconnect_token_at", "next_refresh_at"):
            due = parse_iso(shown[name])
            assert expires is not None
            assert due is not None
            assert expires - due == timedelta(minutes=25), (account_id, name)
