"""An import never stalls the daemon: linear checks, chunked writes, refreshes still commit.

The reproductions (issue 11, item 5): an import whose 30,000 rows repeat one
placeholder refresh token took 355 s, with the event loop frozen for 208 s
(long enough for systemd's watchdog to kill the daemon); and a large import
held the writer for its whole transaction, so every refresh's commit waited.

Here the daemon (a subprocess) keeps 300 accounts refreshing every 2 s against
the simulator (another process, 20 ms per call): a refresh storm of about 150
refreshes a second. While it runs, a large import is posted and two probe
threads ask the public callback and ``/healthz`` every 50 ms. Measured:
how long each refresh's commit took (from the daemon having read Intuit's
answer to its ``refresh.succeeded`` line, written once the commit returned)
before and during the import, and how long the callback took to answer.

``-m slow`` runs the 100,000-row import and writes its figures into
docs/reliability.md; the default run imports 10,000 rows and asserts the same.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, SimulatorProcess, percentile
from tests.faults.test_crash import committed_attempts
from tests.figures import thousands, write_figures

ACCOUNTS = 300
# The goal for a refresh's commit during an import (issue 11), asserted by the
# 100,000-row run. The CI-size run asserts a bound that still tells a commit that
# waits behind a chunk from one that waits behind the whole import, with room for a
# machine shared by other work.
COMMIT_P99_GOAL = 0.250
COMMIT_P99_BOUND = 1.0
CALLBACK_MAX = 1.0  # an answer of the callback or /healthz: under any watchdog or browser
PROBE_EVERY = 0.05


@dataclass
class Probe:
    """Asks ``url`` every 50 ms from its own thread; records (sent at, seconds to answer)."""

    url: str
    answers: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                sent = time.time()
                began = time.perf_counter()
                try:
                    session.get(self.url, timeout=30).close()
                except requests.RequestException as exc:
                    self.failures.append(type(exc).__name__)
                self.answers.append((sent, time.perf_counter() - began))
                self._stop.wait(PROBE_EVERY)

    def during(self, start: float, end: float) -> list[float]:
        return [took for sent, took in self.answers if start <= sent <= end]


@pytest.fixture
def storm(tmp_path: Path) -> Iterator[DaemonProcess]:
    sim = SimulatorProcess(expires_in=120, rotate_after=86_400.0, latency=0.02).start()
    daemon = DaemonProcess(tmp_path / "daemon", sim, lead="118s")  # due 2 s after each refresh
    try:
        daemon.start()
        for number in range(ACCOUNTS):
            daemon.import_grant(f"acct-{number:03d}", sim.grant(), overdue=number % 3 == 0)
        time.sleep(4.0)  # every account refreshed at least once: the storm is steady
        yield daemon
        assert daemon.alive, "the daemon died during the import"
        assert daemon.terminate() == 0
    finally:
        daemon.close()
        sim.close()


def rows(count: int, *, placeholder: bool = False) -> list[dict[str, Any]]:
    """Import rows of accounts whose access tokens live 55 more minutes (not due now)."""
    expires = (datetime.now(UTC) + timedelta(minutes=55)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {
            "account_id": f"imp-{n:06d}",
            "realm_id": str(4_620_000_000 + n),
            "refresh_token": "PLACEHOLDER" if placeholder else f"imported-rt-{n:06d}",
            "access_token": f"imported-at-{n:06d}",
            "token_expires_at": expires,
        }
        for n in range(count)
    ]


def post_import(
    daemon: DaemonProcess, accounts: list[dict[str, Any]], timeout: float = 300
) -> tuple[int, Any, float]:
    began = time.perf_counter()
    status, body = daemon.api("POST", "/v1/import", body={"accounts": accounts}, timeout=timeout)
    return status, body, time.perf_counter() - began


def commit_seconds(daemon: DaemonProcess, start: float, end: float) -> list[float]:
    """Each refresh commit whose answer was read between ``start`` and ``end``: its duration."""
    answered = {
        tid: at for tid, at in committed_attempts(daemon.database).items() if start <= at <= end
    }
    return [
        datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        - answered[event["intuit_tid"]]
        for event in daemon.events()
        if event.get("event") == "refresh.succeeded" and event.get("intuit_tid") in answered
    ]


def test_one_placeholder_token_on_every_row_is_checked_in_linear_time(
    storm: DaemonProcess,
) -> None:
    """The 30,000-row reproduction: answered in seconds, the callback answering throughout."""
    daemon = storm
    with Probe(daemon.callback_url) as callback:
        start = time.time()
        status, body, took = post_import(daemon, rows(30_000, placeholder=True), timeout=60)
        end = time.time()
    assert status == 200, body
    assert (len(body["imported"]), len(body["skipped"])) == (0, 30_000)
    assert max(len(entry["reason"]) for entry in body["skipped"]) < 120
    assert took < 30, f"30,000 rows took {took:.1f}s"
    answers = callback.during(start, end)
    assert answers, "the callback was not asked during the import"
    assert max(answers) < CALLBACK_MAX, f"the callback took {max(answers):.2f}s"
    assert not callback.failures


def import_under_storm(daemon: DaemonProcess, count: int, p99_bound: float) -> dict[str, Any]:
    """Post ``count`` new accounts during the storm; assert and return what was measured."""
    accounts = rows(count)
    with Probe(daemon.callback_url) as callback, Probe(f"{daemon.api_url}/healthz") as health:
        time.sleep(2.0)  # the storm alone, for comparison
        start = time.time()
        status, body, took = post_import(daemon, accounts)
        end = time.time()
        time.sleep(1.0)  # let the last commits of the window log their lines
    assert status == 200, body
    assert (len(body["imported"]), body["skipped"]) == (count, [])
    assert not any(entry["refreshing_now"] for entry in body["imported"])
    status, listed = daemon.api("GET", "/v1/accounts")
    assert sum(1 for a in listed["accounts"] if a["account_id"].startswith("imp-")) == count

    before = commit_seconds(daemon, start - 2.0, start)
    during = commit_seconds(daemon, start, end)
    probes = callback.during(start, end)
    health_probes = health.during(start, end)
    assert len(during) > 100, f"only {len(during)} refreshes committed during the import"
    assert probes
    assert health_probes
    assert not callback.failures
    assert not health.failures
    assert max(probes) < CALLBACK_MAX, f"the callback took {max(probes):.2f}s"
    assert max(health_probes) < CALLBACK_MAX, f"/healthz took {max(health_probes):.2f}s"
    assert percentile(during, 99) < p99_bound, f"p99 {percentile(during, 99):.3f}s"
    return {
        "rows": count,
        "import_s": round(took, 1),
        "rows_per_s": round(count / took),
        "refreshes_committed_during": len(during),
        "commit_p50_ms_before": round(percentile(before, 50) * 1000, 1),
        "commit_p99_ms_before": round(percentile(before, 99) * 1000, 1),
        "commit_p50_ms": round(percentile(during, 50) * 1000, 1),
        "commit_p99_ms": round(percentile(during, 99) * 1000, 1),
        "commit_max_ms": round(max(during) * 1000, 1),
        "callback_probes": len(probes),
        "callback_max_ms": round(max(probes) * 1000, 1),
        "healthz_max_ms": round(max(health_probes) * 1000, 1),
        "load_average": round(os.getloadavg()[0], 1),  # this machine's other work
    }


def test_an_import_under_a_refresh_storm(storm: DaemonProcess, report: Report) -> None:
    report("import", import_under_storm(storm, 10_000, COMMIT_P99_BOUND))


@pytest.mark.slow
def test_a_100k_row_import_under_a_refresh_storm(storm: DaemonProcess, report: Report) -> None:
    figures = import_under_storm(storm, 100_000, COMMIT_P99_GOAL)
    report("import", figures)
    f = figures
    write_figures(
        {
            "import-p99": f"{f['commit_p99_ms']:g} ms",
            "import-figures": (
                f"{thousands(f['rows'])} rows imported in {f['import_s']:g} s "
                f"({thousands(f['rows_per_s'])} rows/s) while "
                f"{thousands(f['refreshes_committed_during'])} refreshes committed; "
                f"refresh commit p50 {f['commit_p50_ms']:g} ms, p99 {f['commit_p99_ms']:g} ms, "
                f"max {f['commit_max_ms']:g} ms (the storm alone, just before: "
                f"p50 {f['commit_p50_ms_before']:g} ms, p99 {f['commit_p99_ms_before']:g} ms); "
                f"the callback answered {f['callback_probes']} probes, the slowest in "
                f"{f['callback_max_ms']:g} ms, and `/healthz` within {f['healthz_max_ms']:g} ms "
                f"(2 cores, load average {f['load_average']:g} from other work)"
            ),
        }
    )
