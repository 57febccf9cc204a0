"""sd_notify against real AF_UNIX datagram sockets, by path and in the abstract namespace."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbo_daemon.runtime.systemd import SystemdNotifier


class Manager:
    """Stands in for PID 1: a bound datagram socket that collects what was sent."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def received(self) -> list[str]:
        messages: list[str] = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    async def next(self) -> str:
        async with asyncio.timeout(2.0):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        return data.decode()


@pytest.fixture
def path_manager(tmp_path: Path) -> Iterator[tuple[Manager, str]]:
    address = str(tmp_path / "notify.sock")
    manager = Manager(address)
    yield manager, address
    manager.sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[tuple[Manager, str]]:
    name = f"qbo-daemon-test-{uuid.uuid4().hex}"
    manager = Manager("\0" + name)
    yield manager, "@" + name
    manager.sock.close()


def test_disabled_without_notify_socket() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.ready("up") is False
    assert notifier.watchdog_interval() is None


def test_unsupported_address_is_disabled() -> None:
    assert not SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not SystemdNotifier({"NOTIFY_SOCKET": ""}).enabled


def test_ready_status_stopping_by_path(path_manager: tuple[Manager, str]) -> None:
    manager, address = path_manager
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.ready("serving 3 accounts")
    assert notifier.status("refreshing 2\nof 3")
    assert notifier.stopping()
    assert manager.received() == [
        "READY=1",
        "READY=1\nSTATUS=serving 3 accounts",
        "STATUS=refreshing 2 of 3",
        "STOPPING=1",
    ]


def test_abstract_namespace(abstract_manager: tuple[Manager, str]) -> None:
    manager, address = abstract_manager
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("ok")
    assert manager.received() == ["READY=1\nSTATUS=ok"]


def test_send_failure_does_not_raise(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.stopping() is False


def test_watchdog_interval_rules() -> None:
    me = str(os.getpid())
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    assert (
        SystemdNotifier({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": me}).watchdog_interval() == 0.1
    )
    other = {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier(other).watchdog_interval() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "soon"}).watchdog_interval() is None


async def test_watchdog_pings_until_stopped(abstract_manager: tuple[Manager, str]) -> None:
    manager, address = abstract_manager
    notifier = SystemdNotifier(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(notifier.watchdog(stop))
    started = loop.time()
    pings = [await manager.next() for _ in range(3)]
    elapsed = loop.time() - started
    assert pings == ["WATCHDOG=1"] * 3
    # The first ping is immediate, then one every 0.1 s.
    assert 0.15 <= elapsed < 1.5
    stop.set()
    await asyncio.wait_for(task, 1.0)
    await asyncio.sleep(0.15)
    assert manager.received() == []


async def test_watchdog_by_path(path_manager: tuple[Manager, str]) -> None:
    manager, address = path_manager
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.watchdog(stop))
    assert await manager.next() == "WATCHDOG=1"
    assert await manager.next() == "WATCHDOG=1"
    stop.set()
    await asyncio.wait_for(task, 1.0)


async def test_watchdog_returns_at_once_without_watchdog(
    path_manager: tuple[Manager, str],
) -> None:
    manager, address = path_manager
    stop = asyncio.Event()
    await asyncio.wait_for(SystemdNotifier({"NOTIFY_SOCKET": address}).watchdog(stop), 0.5)
    await asyncio.wait_for(SystemdNotifier({"WATCHDOG_USEC": "200000"}).watchdog(stop), 0.5)
    assert manager.received() == []
