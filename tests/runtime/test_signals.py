"""Signals and exit statuses of ``qbo-daemon run`` as a real process.

- A second SIGTERM (or SIGINT) during a slow shutdown exits at once.
- SIGHUP reloads run one at a time (signals meanwhile make one more reload)
  and a shutdown waits for the reload under way.
- A listen address in use is one stderr line naming its setting, and exit
  status 2, which the unit's ``RestartPreventExitStatus=2`` does not restart.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.faults.procs import DaemonProcess, SimulatorProcess, wait_until
from tests.figures import write_figure

WEBHOOK_SECRET = "whsec-signals-test-0123456789abcdef"


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(expires_in=3600, rotate_after=86_400.0).start()
    yield sim
    sim.close()


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def in_flight(daemon: DaemonProcess) -> bool:
    metrics = daemon.http.get(f"{daemon.api_url}/metrics", timeout=5).text
    return "qbo_refreshes_in_flight 1.0" in metrics


def test_a_second_sigterm_cuts_a_slow_shutdown_short(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    daemon = DaemonProcess(tmp_path / "daemon", simulator, intuit_timeout="30s")
    daemon.start()
    try:
        grant = simulator.grant()
        simulator.pause()  # Intuit accepts the connection and never answers
        daemon.import_grant("acme", grant, overdue=True)
        wait_until(lambda: in_flight(daemon), timeout=5, what="a refresh hanging on Intuit")

        daemon.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert daemon.alive, "the drain of the hanging refresh should take shutdown_grace"
        second = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(timeout=10)
        exited_after = time.monotonic() - second
    finally:
        simulator.resume()
        daemon.close()
    assert code == 128 + signal.SIGTERM
    assert exited_after < 2.0
    forced = events(daemon, "daemon.exit_forced")
    assert len(forced) == 1
    assert forced[0]["level"] == "warning"
    assert forced[0]["refreshes_abandoned"] == 1
    assert not [line for line in daemon.lines if "Traceback" in line]

    # Cut short is not broken: the next start finds the account and refreshes it.
    daemon.start()
    try:
        assert daemon.api("GET", "/v1/accounts/acme")[0] == 200
        wait_until(
            lambda: daemon.api("GET", "/v1/accounts/acme")[1]["last_refreshed_at"] is not None,
            timeout=15,
            what="the refresh after the restart",
        )
    finally:
        daemon.close()
    write_figure(
        "forced-exit",
        f'A refresh hanging on a silent Intuit, `shutdown_grace = "5s"`: a second SIGTERM '
        f"0.5 s into the drain exited {exited_after * 1000:.0f} ms later with status {code} "
        "and a `daemon.exit_forced` warning; the next start found the account and "
        "refreshed it.",
    )


class SilentWebhook:
    """A webhook receiver that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks"

    def close(self) -> None:
        self.sock.close()


def connect(daemon: DaemonProcess, account_id: str) -> None:
    """The connect flow as a browser runs it."""
    status, body = daemon.api("POST", f"/v1/accounts/{account_id}/authorize-url")
    assert status == 200, body
    page = requests.get(body["url"], timeout=10)
    assert page.status_code == 200, page.text


def test_reloads_run_one_at_a_time_and_a_shutdown_waits_for_one(
    simulator: SimulatorProcess, tmp_path: Path
) -> None:
    hooks = SilentWebhook()
    daemon = DaemonProcess(
        tmp_path / "daemon",
        simulator,
        extra=f'\n[notify]\nwebhook_url = "{hooks.url}/a"\nsecret = "{WEBHOOK_SECRET}"\n',
    )
    daemon.start()

    def point_webhook_at(path: str) -> None:
        text = daemon.config_path.read_text(encoding="utf-8")
        start = text.index("webhook_url = ")
        end = text.index("\n", start)
        daemon.config_path.write_text(
            text[:start] + f'webhook_url = "{hooks.url}/{path}"' + text[end:], encoding="utf-8"
        )

    try:
        # A delivery hangs on the silent receiver: replacing that notifier waits (up to
        # 5 s) for it, which makes the first reload slow.
        connect(daemon, "acme")
        point_webhook_at("b")
        daemon.signal(signal.SIGHUP)
        time.sleep(0.3)
        point_webhook_at("c")
        daemon.signal(signal.SIGHUP)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: len(events(daemon, "daemon.reloaded")) == 2, timeout=20, what="two")
        time.sleep(1.0)  # no third reload follows
        sequence = [
            e["event"]
            for e in daemon.events()
            if e.get("event") in ("daemon.reload_started", "daemon.reloaded")
        ]
        assert sequence == ["daemon.reload_started", "daemon.reloaded"] * 2

        # A slow reload again, and SIGTERM while it runs: the shutdown waits for it.
        connect(daemon, "beta")
        point_webhook_at("d")
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: len(events(daemon, "daemon.reload_started")) == 3, timeout=5, what="3rd")
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
    finally:
        daemon.close()
        hooks.close()
    assert code == 0
    names = [e.get("event") for e in daemon.events()]
    assert names.count("daemon.reloaded") == 3
    assert names.index("daemon.shutdown_started") < len(names) - 1 - names[::-1].index(
        "daemon.reloaded"
    )
    assert names[-1] == "daemon.stopped"
    assert not [line for line in daemon.lines if "Traceback" in line or "destroyed" in line]


@pytest.mark.parametrize("section", ["callback", "api"])
def test_a_listen_address_in_use_names_its_setting_and_exits_2(
    simulator: SimulatorProcess, tmp_path: Path, section: str
) -> None:
    daemon = DaemonProcess(tmp_path / "daemon", simulator)
    port = daemon.callback_port if section == "callback" else daemon.api_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        started = time.monotonic()
        daemon.spawn()
        code = daemon.wait(timeout=30)
        took = time.monotonic() - started
    daemon.close()
    assert code == 2
    errors = [line for line in daemon.lines if line.startswith("qbo-daemon: error:")]
    assert errors == [
        f"qbo-daemon: error: {daemon.config_path}: [{section}] listen: 127.0.0.1:{port} is "
        "already in use by another process; stop it or choose another"
    ]
    assert not [line for line in daemon.lines if "Traceback" in line]
    if section == "callback":
        shown = errors[0].replace(str(daemon.config_path), "CONFIG").replace(str(port), "PORT")
        write_figure(
            "listen-in-use",
            f"`[callback] listen` on a port another process holds: one line on stderr, "
            f"`{shown}`, and exit status 2 after {took:.1f} s (the whole start of a "
            "Python process); the unit's `RestartPreventExitStatus=2` leaves it stopped.",
        )
