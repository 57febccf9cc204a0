"""Intuit failing or gone for longer than an access token lives: back off, mark nothing, recover.

The daemon reaches the simulator (another process) through a :class:`Gate`.
Five outages, each longer than the access tokens live: 503 pages with
``Retry-After``, nginx HTML 502 pages, calls that hang past the daemon's
timeout, the simulator process stopped (SIGSTOP: connections are accepted by
the kernel and never answered) and "Intuit" gone (nothing listens: connection
refused). During each: no account is ever ``needs_reconnect``, every account
turns ``expired`` once its token is dead, ``GET .../token`` answers 503, and
retries back off (attempt times from the simulator's log and the daemon's).
After each: every account is active with a live token within about one capped
backoff.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, Gate, SimulatorProcess, parse_time, wait_until

EXPIRES_IN = 2  # seconds an access token lives
OUTAGE = 4.5  # seconds each outage lasts: over twice a token's life
ACCOUNTS = 8
BACKOFF_MAX = 2.0
RETRY_AFTER = 1.0
RECOVERY_LIMIT = BACKOFF_MAX + 3.0  # one capped backoff, plus slack for a loaded machine


def test_outages_longer_than_token_life(tmp_path: Path, report: Report) -> None:
    sim = SimulatorProcess(expires_in=EXPIRES_IN, rotate_after=86_400.0).start()
    gate = Gate(sim.port)
    gate.open()
    daemon = DaemonProcess(
        tmp_path / "daemon",
        sim,
        intuit_url=gate.url,
        backoff_initial="0.3s",
        backoff_max=f"{BACKOFF_MAX:g}s",
        intuit_timeout="1s",
        refresh_extra='token_wait = "1s"',
    )
    try:
        daemon.start()
        for number in range(ACCOUNTS):
            daemon.import_grant(f"acct-{number}", sim.grant(), overdue=False)
        wait_until(lambda: all_fresh(daemon), timeout=10, what="first refreshes")

        def faults(kind: str) -> Callable[[], None]:
            def begin() -> None:
                sim.fault(kind, 1_000_000, retry_after=RETRY_AFTER if kind == "503" else None)

            return begin

        def undo(action: Callable[[], None]) -> Callable[[], list[dict[str, Any]]]:
            def run() -> list[dict[str, Any]]:
                action()
                return []

            return run

        outages: list[tuple[str, Callable[[], None], Callable[[], list[dict[str, Any]]]]] = [
            ("503", faults("503"), sim.clear_faults),
            ("html", faults("502_html"), sim.clear_faults),
            ("hang", faults("hang"), sim.clear_faults),
            ("stopped", sim.pause, undo(sim.resume)),
            ("gone", gate.shut, undo(gate.open)),
        ]
        results = []
        for name, begin, end in outages:
            results.append(run_outage(name, daemon, sim, begin, end))
        report("outages", {"expires_in": EXPIRES_IN, "outage_s": OUTAGE, "phases": results})
        check_backoff_in_daemon_log(daemon)
        assert daemon.terminate() == 0
    finally:
        daemon.close()
        gate.shut()
        sim.close()


def run_outage(
    name: str,
    daemon: DaemonProcess,
    sim: SimulatorProcess,
    begin: Callable[[], None],
    end: Callable[[], list[dict[str, Any]]],
) -> dict[str, Any]:
    began = time.time()
    begin()
    expired_seen: set[str] = set()
    token_answers: set[int] = set()
    while time.time() - began < OUTAGE:
        for account in accounts(daemon):
            assert account["status"] != "needs_reconnect", (name, account)
            if account["status"] == "expired":
                expired_seen.add(account["account_id"])
        if len(expired_seen) == ACCOUNTS and not token_answers:
            status, body = daemon.api("GET", "/v1/accounts/acct-0/token")
            token_answers.add(status)
            assert status == 503, (name, status, body)
            assert body["error"] == "unavailable", (name, body)
        time.sleep(0.25)
    ended = time.time()
    log = end()  # the simulator's log of a fault phase (its faults are dropped with it)
    wait_until(lambda: all_fresh(daemon), timeout=RECOVERY_LIMIT + 10, what=f"{name}: recovery")
    recovered = time.time() - ended
    assert expired_seen == {f"acct-{n}" for n in range(ACCOUNTS)}, (name, expired_seen)
    assert token_answers == {503}, name
    assert recovered <= RECOVERY_LIMIT, f"{name}: recovered only after {recovered:.1f}s"
    attempts = attempt_times(log, began, ended)
    per_account = [len(times) for times in attempts.values()]
    if attempts:
        # Backing off: a handful of attempts per account, not one per 50 ms.
        assert max(per_account) <= 12, (name, per_account)
        assert min(per_account) >= 1, (name, per_account)  # hangs: 1 s each, then backoff
    if name == "503":
        for times in attempts.values():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps) >= RETRY_AFTER - 0.05, f"Retry-After not honoured: {gaps}"
    return {
        "outage": name,
        "recovered_after_s": round(recovered, 2),
        "attempts_per_account": sorted(per_account) or None,
        "all_expired_meanwhile": True,
        "needs_reconnect": 0,
    }


def accounts(daemon: DaemonProcess) -> list[dict[str, Any]]:
    status, body = daemon.api("GET", "/v1/accounts")
    assert status == 200, body
    found: list[dict[str, Any]] = body["accounts"]
    return found


def all_fresh(daemon: DaemonProcess) -> bool:
    now = time.time()
    return all(
        a["status"] == "active" and parse_time(a["token_expires_at"]) > now
        for a in accounts(daemon)
    )


def attempt_times(log: list[dict[str, Any]], began: float, ended: float) -> dict[str, list[float]]:
    """Arrival times of refresh calls during the outage, per presented refresh token."""
    times: dict[str, list[float]] = defaultdict(list)
    for entry in log:
        at = parse_time(entry["at"])
        if entry["grant_type"] == "refresh_token" and began + 0.1 <= at <= ended:
            times[entry["presented_refresh_token"]].append(at)
    return times


def check_backoff_in_daemon_log(daemon: DaemonProcess) -> None:
    """Every retry delay stays within the cap (or Retry-After); once expired, at least half."""
    retries = [e for e in daemon.events() if e.get("event") == "refresh.retry_scheduled"]
    assert retries
    for event in retries:
        delay = float(event["delay"])
        assert delay <= max(BACKOFF_MAX, RETRY_AFTER) + 0.01, event
        if event.get("status") == "expired":
            assert delay >= BACKOFF_MAX / 2 - 0.01, event
