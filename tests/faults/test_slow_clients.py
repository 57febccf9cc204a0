"""Hostile clients on the public callback port, against the real daemon process.

The reproduction this answers (issue 11, item 3): 300 half-sent requests on
the callback port ran the daemon out of file descriptors and took the token
API, the callback and the calls to Intuit down together, while asyncio logged
every failed ``accept()`` (about 137,000 lines in 50 s); one idle half-request
stayed open 400 s. Here the daemon's file limit is lowered with ``prlimit``
so that twice the callback's connection cap would exhaust it, as 300 did.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.faults.procs import DaemonProcess, SimulatorProcess, wait_until
from tests.figures import write_figure

CAP = 50
READ_TIMEOUT = 3.0
HALF_REQUEST = b"GET /accounts/oauth2_callback?state=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(expires_in=3600, rotate_after=86_400.0).start()
    yield sim
    sim.close()


@pytest.fixture
def daemon(simulator: SimulatorProcess, tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "daemon",
        simulator,
        callback_extra=f'max_connections = {CAP}\nread_timeout = "{READ_TIMEOUT:g}s"',
    )
    process.start()
    yield process
    process.close()


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def limit_open_files(pid: int, soft: int) -> None:
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def half_requests(port: int, count: int) -> list[tuple[socket.socket, float]]:
    """``count`` connections that each send a request head without its end, then wait."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(HALF_REQUEST)
        opened.append((sock, time.monotonic()))
    return opened


def closed_after(sock: socket.socket, since: float, timeout: float) -> float:
    """Seconds from ``since`` until the daemon closed ``sock`` (it sends nothing first)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        data = b""
    assert data == b"", data[:200]
    return time.monotonic() - since


def timed(call: object) -> tuple[float, requests.Response]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return time.monotonic() - started, response


def test_twice_the_cap_of_slow_clients_leaves_the_api_and_the_callback_answering(
    daemon: DaemonProcess, simulator: SimulatorProcess
) -> None:
    daemon.import_grant("acme", simulator.grant(), overdue=False)
    # Room for the cap and for the requests below, not for twice the cap: without a cap,
    # the half-sent requests exhaust the daemon's file descriptors.
    baseline = open_files(daemon.pid)
    limit = baseline + CAP + 30
    limit_open_files(daemon.pid, limit)

    slow = half_requests(daemon.callback_port, 2 * CAP)
    try:
        # The token API, on its own listener.
        api_seconds, answer = timed(
            lambda: daemon.http.get(f"{daemon.api_url}/v1/accounts/acme/token", timeout=5)
        )
        assert answer.status_code == 200, answer.text
        assert api_seconds < 1.0

        # A normal callback: the browser comes back from Intuit and the account connects.
        status, body = daemon.api("POST", "/v1/accounts/beta/authorize-url", timeout=5)
        assert status == 200, body
        to_intuit = requests.get(body["url"], allow_redirects=False, timeout=5)
        assert to_intuit.status_code == 302
        callback_seconds, page = timed(
            lambda: requests.get(to_intuit.headers["Location"], timeout=5)
        )
        assert page.status_code == 200, page.text
        assert callback_seconds < 1.0
        status, account = daemon.api("GET", "/v1/accounts/beta", timeout=5)
        assert (status, account["status"]) == (200, "active")

        # Every half-request is closed: the oldest at once, to admit newer ones; the
        # rest when the read deadline passes. None is left open.
        waits = [closed_after(sock, since, READ_TIMEOUT + 5) for sock, since in slow]
    finally:
        for sock, _ in slow:
            sock.close()
    evicted = sum(1 for wait in waits if wait < READ_TIMEOUT - 0.5)
    assert evicted >= CAP
    assert max(waits) < READ_TIMEOUT + 2.0
    wait_until(
        lambda: open_files(daemon.pid) <= baseline + 5, timeout=5, what="connections released"
    )
    assert not [line for line in daemon.lines if "Traceback" in line]

    timed_out = sorted(wait for wait in waits if wait >= READ_TIMEOUT - 0.5)
    write_figure(
        "slow-clients",
        f"{2 * CAP} half-sent requests on a callback capped at {CAP} connections, the "
        f"daemon's file limit lowered to {limit} (room for the cap, not for twice it): "
        f"the token API answered in {api_seconds * 1000:.0f} ms and a connect flow's "
        f"callback in {callback_seconds * 1000:.0f} ms. {evicted} half-requests were closed "
        f"as newer connections took their place, the other {len(timed_out)} "
        f"{_span(timed_out)} after they connected "
        f'(`read_timeout = "{READ_TIMEOUT:g}s"`).',
    )


def test_accept_failures_for_want_of_files_are_logged_at_a_limited_rate(
    daemon: DaemonProcess,
) -> None:
    baseline = open_files(daemon.pid)
    limit_open_files(daemon.pid, baseline + 5)
    held: list[socket.socket] = []
    try:
        # Fewer than the cap: every accept() past the fifth fails with EMFILE.
        for _ in range(CAP - 10):
            held.append(socket.create_connection(("127.0.0.1", daemon.callback_port), timeout=5))
        watched = 3.0
        time.sleep(watched)
        failures = [e for e in daemon.events() if e.get("event") == "listener.accept_failed"]
        assert len(failures) == 1, failures
        assert failures[0]["level"] == "error"
        assert failures[0]["listener"] == "callback"
        assert "Too many open files" in failures[0]["error"]
        assert not [line for line in daemon.lines if "out of system resource" in line]
        lines_while_starved = len(daemon.lines)
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
    limit_open_files(daemon.pid, 4096)
    # Starved no longer: both listeners answer again.
    wait_until(
        lambda: requests.get(f"{daemon.api_url}/healthz", timeout=2).status_code == 200,
        timeout=10,
        what="the API answers again",
    )
    page = requests.get(daemon.callback_url, timeout=5)
    assert page.status_code == 400  # no state: our page, nothing stored
    write_figure(
        "accept-errors",
        f"File limit lowered to 5 above what the daemon held, {CAP - 10} connections held "
        f"open on the callback for {watched:g} s: 1 `listener.accept_failed` line, "
        f"{lines_while_starved} log lines in all. Both listeners answered again once "
        "files were free.",
    )


def _span(values: list[float]) -> str:
    low, high = f"{values[0]:.1f}", f"{values[-1]:.1f}"
    return f"{low} s" if low == high else f"{low}–{high} s"
