"""The systemd watchdog is fed by the refresh dispatcher's own heartbeat.

Real daemon processes under a stand-in for systemd: a datagram socket named
by ``$NOTIFY_SOCKET``, ``WATCHDOG_USEC`` of one second (a ping every 0.5 s).
A dispatcher that stops turning stops the pings, though the event loop and
the listeners run on; a dispatcher that waits for a free slot while every
refresh hangs on a silent Intuit is not wedged, and the pings go on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.faults.procs import DaemonProcess, SimulatorProcess, wait_until
from tests.figures import write_figure

WATCHDOG_USEC = 1_000_000
INTERVAL = WATCHDOG_USEC / 2 / 1_000_000
REPO = Path(__file__).resolve().parent.parent.parent


class NotifySocket:
    """Stands in for systemd: collects (arrival time, message) from a reader thread."""

    def __init__(self) -> None:
        self.name = f"qbo-daemon-watchdog-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self, since: float = 0.0) -> list[float]:
        return [
            at for at, message in list(self.messages) if message == "WATCHDOG=1" and at >= since
        ]

    def env(self, watchdog_usec: int = WATCHDOG_USEC) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QBO_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))
        }
        env.update(
            NOTIFY_SOCKET="@" + self.name,
            WATCHDOG_USEC=str(watchdog_usec),
            PYTHONPATH=str(REPO),
        )
        return env

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    manager = NotifySocket()
    yield manager
    manager.close()


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(expires_in=3600, rotate_after=86_400.0).start()
    yield sim
    sim.close()


def test_a_wedged_dispatcher_stops_the_pings_while_the_loop_runs_on(
    notify: NotifySocket, simulator: SimulatorProcess, tmp_path: Path
) -> None:
    daemon = DaemonProcess(
        tmp_path / "daemon", simulator, env=notify.env(), module="tests.runtime.wedge_driver"
    )
    daemon.start()
    try:
        wait_until(lambda: len(notify.pings()) >= 3, timeout=10, what="watchdog pings")
        wedged_at = time.monotonic()
        (daemon.data_dir / "wedge").touch()
        time.sleep(5.0)
        after = [at - wedged_at for at in notify.pings(since=wedged_at)]
        # The event loop is not blocked: the API answers. Only the dispatcher is stuck.
        assert requests.get(f"{daemon.api_url}/healthz", timeout=2).status_code == 200
    finally:
        daemon.close()
    assert after, "no ping at all after the wedge: the test proves nothing"
    assert after[-1] < 3.0, after  # max_wait 0.5 s + heartbeat limit 1.5 s + one interval
    stalled = [e for e in daemon.events() if e.get("event") == "watchdog.dispatcher_stalled"]
    assert len(stalled) == 1
    assert stalled[0]["level"] == "critical"
    write_figure(
        "watchdog-wedge",
        f"`WATCHDOG_USEC` of 1 s (a ping every {INTERVAL:g} s): with the dispatcher wedged "
        f"and the event loop running on (the API answered), the last `WATCHDOG=1` came "
        f"{after[-1]:.1f} s after the wedge, beside one critical `watchdog.dispatcher_stalled` "
        "line; systemd restarts a daemon one `WatchdogSec` after its last ping.",
    )


def test_waiting_for_a_slot_while_intuit_hangs_is_not_a_wedge(
    notify: NotifySocket, simulator: SimulatorProcess, tmp_path: Path
) -> None:
    # A 2 s watchdog (a ping every second): room for a loaded machine's event-loop lag.
    daemon = DaemonProcess(
        tmp_path / "daemon",
        simulator,
        env=notify.env(2 * WATCHDOG_USEC),
        intuit_timeout="8s",
        refresh_extra="concurrency = 1",
    )
    daemon.start()
    try:
        grants = [simulator.grant() for _ in range(3)]
        simulator.pause()
        for n, grant in enumerate(grants):
            daemon.import_grant(f"acct-{n}", grant, overdue=True)
        # Both dispatch slots (twice the concurrency) hang on Intuit; the third waits.
        wait_until(
            lambda: (
                "qbo_refreshes_in_flight 1.0" in daemon.http.get(f"{daemon.api_url}/metrics").text
            ),
            timeout=5,
            what="a refresh hanging on Intuit",
        )
        since = time.monotonic()
        time.sleep(4.0)
        pings = notify.pings(since=since)
    finally:
        simulator.resume()
        daemon.close()
    gaps = [b - a for a, b in zip([since, *pings], pings, strict=False)]
    assert len(pings) >= 3, pings
    assert max(gaps) < 2 * 2 * INTERVAL, gaps
    assert not [e for e in daemon.events() if e.get("event") == "watchdog.dispatcher_stalled"]
