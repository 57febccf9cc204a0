"""The supervised runtime: a long-lived task that ends unasked ends the daemon, loudly.

The process test breaks a real listener from outside: it takes a copy of the
daemon's listening socket (``pidfd_getfd(2)``, Linux 5.6+) and shuts it
down, so every ``accept()`` on it fails with EINVAL. Before the supervisor,
asyncio logged that failure forever while the daemon kept running without
its callback; now the daemon logs the dead task at critical level, stops in
order and exits 1, so that systemd starts a fresh one. The in-process tests
end the dispatcher and the database writer the only way they can end (a
cancellation from outside: their loops catch every exception) and check that
the daemon says which, stops, and fails.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import structlog

from qbo_daemon.core.clock import SystemClock
from qbo_daemon.core.models import Secret
from qbo_daemon.runtime.supervisor import Supervisor, TaskDiedError
from qbo_daemon.runtime.webhooks import WebhookNotifier
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.store.repository import Storage
from tests.faults.procs import DaemonProcess, SimulatorProcess
from tests.figures import write_figure
from tests.harness import start_daemon

_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
WEBHOOK_SECRET = Secret("whsec-supervisor-test-0123456789")


def listening_fd(pid: int, port: int) -> int:
    """The descriptor number of the socket ``pid`` listens on at ``port`` (IPv4)."""
    inode = None
    with open(f"/proc/{pid}/net/tcp", encoding="ascii") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                inode = fields[9]
    assert inode is not None, f"nothing listens on {port}"
    for name in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{name}") == f"socket:[{inode}]":
            return int(name)
    raise AssertionError(f"no descriptor of {pid} holds socket {inode}")


def steal_socket(pid: int, fd: int) -> socket.socket:
    """A duplicate of another process's socket (it shares the listening socket itself)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            pytest.skip(f"pidfd_getfd is not available here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=dup)


@pytest.fixture
def simulator_process() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(expires_in=3600, rotate_after=86_400.0).start()
    yield sim
    sim.close()


def test_a_listener_broken_from_outside_ends_the_daemon_with_a_critical_line(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    daemon = DaemonProcess(tmp_path / "daemon", simulator_process)
    daemon.start()
    try:
        stolen = steal_socket(daemon.pid, listening_fd(daemon.pid, daemon.callback_port))
        broken_at = time.monotonic()
        with stolen:
            stolen.shutdown(socket.SHUT_RDWR)
        code = daemon.wait(timeout=30)
        exited_after = time.monotonic() - broken_at
    finally:
        daemon.close()

    assert code == 1
    died = [e for e in daemon.events() if e.get("event") == "supervisor.task_died"]
    assert len(died) == 1, died
    assert died[0]["level"] == "critical"
    assert died[0]["task"] == "listener:callback"
    assert "Invalid argument" in died[0]["error"]
    events = [e.get("event") for e in daemon.events()]
    assert events.index("supervisor.task_died") < events.index("daemon.shutdown_started")
    assert events[-1] == "daemon.stopped"
    errors = [line for line in daemon.lines if line.startswith("qbo-daemon: error:")]
    assert len(errors) == 1, errors
    assert "listener:callback" in errors[0]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{daemon.api_url}/healthz", timeout=2)
    write_figure(
        "supervisor-exit",
        "The callback's listening socket shut down from outside (`pidfd_getfd` + "
        f"`shutdown`): one critical `supervisor.task_died` line naming `listener:callback`, "
        f"an orderly stop, and exit status 1 {exited_after:.1f} s later.",
    )


@pytest.mark.parametrize("task", ["dispatcher", "storage-writer"])
async def test_a_supervised_task_that_ends_stops_the_daemon_and_fails_it(
    simulator: IntuitSimulator, tmp_path: Path, task: str
) -> None:
    running = await start_daemon(simulator, tmp_path / "daemon")
    try:
        assert await running.connect("acme") == 200
        services = running.services
        storage = services.storage
        assert isinstance(storage, Storage)  # the daemon's store is SQLite's
        victim = services.scheduler.dispatcher if task == "dispatcher" else storage.writer
        assert victim is not None
        with structlog.testing.capture_logs() as logs:
            victim.cancel()
            async with asyncio.timeout(20):
                with pytest.raises(TaskDiedError) as raised:
                    await running.task
    finally:
        await running.session.close()
    assert raised.value.name == task
    died = [line for line in logs if line["event"] == "supervisor.task_died"]
    assert [(d["log_level"], d["task"], d["how"]) for d in died] == [
        ("critical", task, "cancelled")
    ]
    events = [line["event"] for line in logs]
    assert events.index("supervisor.task_died") < events.index("daemon.shutdown_started")
    assert events[-1] == "daemon.stopped"


async def test_asked_to_stop_nothing_is_a_death() -> None:
    stop = asyncio.Event()
    supervisor = Supervisor(stop)

    async def forever() -> None:
        await asyncio.Event().wait()

    async def until_stop() -> None:
        await stop.wait()

    supervisor.start("forever", forever())
    supervisor.start("until-stop", until_stop())
    with structlog.testing.capture_logs() as logs:
        stop.set()
        assert await asyncio.wait_for(supervisor.wait(), 1) is None
        await supervisor.aclose()
    assert logs == []


async def test_a_task_that_returns_is_a_death_too() -> None:
    supervisor = Supervisor(asyncio.Event())

    async def forever() -> None:
        await asyncio.Event().wait()

    async def quits() -> None:
        await asyncio.sleep(0.01)

    supervisor.start("steady", forever())
    supervisor.start("quitter", quits())
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(supervisor.wait(), 2) == "quitter"
        await supervisor.aclose()
    assert [(line["task"], line["how"]) for line in logs] == [("quitter", "returned")]


async def test_a_webhook_worker_ends_the_daemon_unless_its_notifier_closed_it() -> None:
    async def deliveries(notifier: WebhookNotifier) -> list[asyncio.Task[Any]]:
        notifier.emit("account.connected", "acme")
        return [t for t in asyncio.all_tasks() if t.get_name().startswith("webhook-worker-")]

    async with aiohttp.ClientSession() as session:
        # Closed by its owner (a reload replaces it, or the daemon stops): no death.
        supervisor = Supervisor(asyncio.Event())
        notifier = WebhookNotifier(
            session,
            "http://127.0.0.1:9/hooks",
            WEBHOOK_SECRET,
            clock=SystemClock(),
            supervisor=supervisor,
            concurrency=2,
        )
        assert len(await deliveries(notifier)) == 2
        await notifier.aclose(0.1)
        await asyncio.sleep(0)
        assert supervisor.failure is None

        # A worker that ends while its notifier runs is a death.
        supervisor = Supervisor(asyncio.Event())
        notifier = WebhookNotifier(
            session,
            "http://127.0.0.1:9/hooks",
            WEBHOOK_SECRET,
            clock=SystemClock(),
            supervisor=supervisor,
            concurrency=2,
        )
        workers = await deliveries(notifier)
        workers[0].cancel()
        with structlog.testing.capture_logs():
            assert await asyncio.wait_for(supervisor.wait(), 2) == workers[0].get_name()
        await notifier.aclose(0.1)
