"""kill -9 during refresh storms: nothing persisted is lost, no older token comes back.

The daemon runs as a subprocess against the simulator in another process. Access
tokens live a few seconds, so every account refreshes every couple of seconds,
and half the accounts start overdue: each restart begins with a catch-up storm.
Each round starts the daemon, lets it run for a random moment, kills it with
SIGKILL, and checks a copy of its database against the simulator's request log:

- every account decrypts, with the same key;
- every account is at its previous refresh token and version, or newer;
- no account is ``needs_reconnect`` unless the simulator rotated its refresh
  token in an answer that never reached our database (the inherent window
  between Intuit's answer and our commit, counted and timed);
- no refresh token was presented after a newer one had been issued, except
  in that same case, and never within one life of the daemon.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import Report
from tests.faults.procs import (
    DaemonProcess,
    DbRow,
    SimulatorProcess,
    parse_time,
    percentile,
    sqlite_commit_baseline,
    wait_until,
)

ACCOUNTS = 30
EXPIRES_IN = 4  # seconds: with the 10 min lead, each account refreshes every 2 s
LATENCY = 0.01
MAX_LIFE = 0.8  # seconds the daemon lives in a round, at most (uniform from 0)


@dataclass
class Ledger:
    """What the simulator's log says about each account's refresh-token chain."""

    lives: list[tuple[float, float]]
    position: dict[str, tuple[str, int]] = field(default_factory=dict)  # rt -> (account, k)
    newest: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    newest_life: dict[str, int] = field(default_factory=dict)
    stale: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0

    def life_of(self, at: float) -> int:
        for number, (began, ended) in enumerate(self.lives):
            if began <= at <= ended:
                return number
        raise AssertionError(f"a refresh arrived at {at} while no daemon was alive")

    def feed(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries[self.seen :]:
            self.seen += 1
            if entry["endpoint"] != "token" or entry["grant_type"] != "refresh_token":
                continue
            presented = entry["presented_refresh_token"]
            account, k = self.position[presented]
            life = self.life_of(parse_time(entry["at"]))
            if k < self.newest[account]:
                self.stale.append(
                    {
                        "account": account,
                        "presented": k,
                        "newest": self.newest[account],
                        "life": life,
                        "newest_life": self.newest_life[account],
                        "status": entry["status"],
                        "error": entry["error"],
                    }
                )
            issued = entry["issued_refresh_token"]
            if entry["status"] == 200 and issued and issued != presented:
                self.position[issued] = (account, k + 1)
                self.newest[account] = k + 1
                self.newest_life[account] = life


@pytest.mark.parametrize("rotation", ["intuit-like", "every-refresh"])
def test_kill9_during_refresh_storms(
    rotation: str, rounds: int, tmp_path: Path, report: Report
) -> None:
    run_crash_rounds(rotation, rounds, tmp_path, report, accounts=ACCOUNTS)


@pytest.mark.slow
@pytest.mark.parametrize("rotation", ["intuit-like", "every-refresh"])
def test_kill9_long_run(rotation: str, rounds: int, tmp_path: Path, report: Report) -> None:
    run_crash_rounds(rotation, max(rounds, 150), tmp_path, report, accounts=80)


def run_crash_rounds(
    rotation: str, rounds: int, tmp_path: Path, report: Report, *, accounts: int
) -> None:
    rotate_after = 86_400.0 if rotation == "intuit-like" else 0.0
    rng = random.Random(f"{rotation}-{rounds}")
    sim = SimulatorProcess(expires_in=EXPIRES_IN, rotate_after=rotate_after, latency=LATENCY)
    daemon = DaemonProcess(tmp_path / "daemon", sim, backoff_initial="0.2s", backoff_max="2s")
    sim.start()
    try:
        daemon.start()
        ledger = Ledger(lives=[])
        for number in range(accounts):
            account_id = f"acct-{number:03d}"
            grant = sim.grant()
            ledger.position[grant["refresh_token"]] = (account_id, 0)
            daemon.import_grant(account_id, grant, overdue=number % 2 == 0)
        previous: dict[str, DbRow] = {}
        lost: dict[str, int] = {}  # account -> round whose kill lost its newest refresh token
        needs_reconnect_seen: set[str] = set()
        kills_in_flight = 0
        for number in range(rounds):
            if number:
                daemon.start()
            time.sleep(rng.uniform(0.0, MAX_LIFE))
            daemon.kill9()
            ledger.lives.append((daemon.starts[-1], daemon.stops[-1]))
            time.sleep(5 * LATENCY)  # let the simulator log calls it was answering
            ledger.feed(sim.log())
            snapshot = daemon.snapshot(tmp_path / "snapshot")
            hits = check_round(number, snapshot, previous, ledger, lost)
            kills_in_flight += bool(hits)
            needs_reconnect_seen |= {
                a for a, r in snapshot.items() if r.status == "needs_reconnect"
            }
            previous = snapshot

        # A last, clean life: every account that lost nothing ends active and fresh.
        daemon.start()
        wait_until(
            lambda: all_settled(daemon, lost), timeout=3 * EXPIRES_IN + 10, what="all settled"
        )
        assert daemon.terminate() == 0
        ledger.lives.append((daemon.starts[-1], daemon.stops[-1]))
        ledger.feed(sim.log())
        final = daemon.snapshot(tmp_path / "snapshot")
        check_round(rounds, final, previous, ledger, lost)
        for account_id, row in final.items():
            if account_id in lost:
                assert row.status == "needs_reconnect", (account_id, row.status)
            else:
                assert row.status == "active", (account_id, row.status, row.last_error)

        log = sim.log()
        refreshes = [e for e in log if e["grant_type"] == "refresh_token"]
        window = answer_to_commit(daemon, log)
        committed = committed_attempts(tmp_path / "snapshot" / "copy.sqlite3")
        internal = daemon_side_window(daemon, committed)
        answered = {e["intuit_tid"] for e in refreshes if e["status"] == 200}
        baseline = sqlite_commit_baseline(tmp_path)
        figures: dict[str, Any] = {
            "rotation": rotation,
            "rounds": rounds,
            "accounts": accounts,
            "refreshes_answered": sum(1 for e in refreshes if e["status"] == 200),
            "invalid_grant": sum(1 for e in refreshes if e["error"] == "invalid_grant"),
            "window_hits": len(lost),
            "kills_that_hit_the_window": kills_in_flight,
            "stale_presentations": len(ledger.stale),
            "answers_never_committed": len(answered - set(committed)),
            "of_which_answered_after_the_kill": lost_inside_intuit(
                refreshes, answered - set(committed), daemon.kills
            ),
            "answer_to_commit_ms": summary(window),
            "answer_read_to_commit_ms": summary(internal),
            "bare_sqlite_commit_ms": summary(baseline),
        }
        report("crash", figures)
        if rotation == "intuit-like":
            assert not lost
            assert not ledger.stale
            assert not needs_reconnect_seen
    finally:
        daemon.close()
        sim.close()


def check_round(
    number: int,
    snapshot: dict[str, DbRow],
    previous: dict[str, DbRow],
    ledger: Ledger,
    lost: dict[str, int],
) -> int:
    """Assert the invariants after round ``number``; returns how many accounts it lost."""
    assert set(snapshot) == set(previous or snapshot), "an account appeared or vanished"
    hits = 0
    for account_id, row in snapshot.items():
        assert row.refresh_token is not None, account_id
        owner, k = ledger.position[row.refresh_token]
        assert owner == account_id, f"{account_id} holds {owner}'s refresh token"
        before = previous.get(account_id)
        if before is not None:
            assert before.refresh_token is not None
            _, k_before = ledger.position[before.refresh_token]
            assert k >= k_before, f"round {number}: {account_id} went back to an older token"
            assert row.version >= before.version, f"round {number}: {account_id} version fell"
            assert (row.token_expires_at or "") >= (before.token_expires_at or ""), account_id
        if k < ledger.newest[account_id] and account_id not in lost:
            # Intuit rotated in an answer that this round's kill kept from our database.
            # Issued in this life, or in an earlier one whose answer the simulator logged
            # only after that round's look (it was still in its latency when we read it).
            assert ledger.newest_life[account_id] <= number, account_id
            lost[account_id] = number
            hits += 1
        if row.status == "needs_reconnect":
            assert account_id in lost, f"round {number}: {account_id} spuriously needs_reconnect"
            assert "invalid_grant" in (row.last_error or ""), row.last_error
    for stale in ledger.stale:
        # Presenting an older token is only ever the next life's first try after a lost answer.
        assert stale["account"] in lost, stale
        assert stale["life"] > stale["newest_life"], f"stale token within one life: {stale}"
        assert stale["error"] == "invalid_grant", stale
    return hits


def all_settled(daemon: DaemonProcess, lost: dict[str, int]) -> bool:
    status, body = daemon.api("GET", "/v1/accounts")
    assert status == 200, body
    now = time.time()
    for account in body["accounts"]:
        if account["account_id"] in lost:
            if account["status"] != "needs_reconnect":
                return False
        elif account["status"] != "active" or parse_time(account["token_expires_at"]) <= now:
            return False
    return True


def answer_to_commit(daemon: DaemonProcess, log: list[dict[str, Any]]) -> list[float]:
    """Seconds from the simulator's answer to the daemon's ``refresh.succeeded`` line.

    The line is written after the commit returned, so this bounds the window
    from above; the answer left the simulator ``LATENCY`` after the request
    arrived.
    """
    answered = {
        e["intuit_tid"]: parse_time(e["at"]) + LATENCY
        for e in log
        if e["grant_type"] == "refresh_token" and e["status"] == 200
    }
    window = []
    for event in daemon.events():
        if event.get("event") == "refresh.succeeded" and event.get("intuit_tid") in answered:
            window.append(parse_time(event["timestamp"]) - answered[event["intuit_tid"]])
    return window


def lost_inside_intuit(refreshes: list[dict[str, Any]], lost: set[str], kills: list[float]) -> int:
    """Lost answers the simulator sent only after the SIGKILL: no client could have kept them.

    The rest were answered before the kill, in the daemon's own window (reading the
    answer, encrypting, committing).
    """
    inside = 0
    for entry in refreshes:
        if entry["intuit_tid"] in lost:
            answered_at = parse_time(entry["at"]) + LATENCY
            kill = min((k for k in kills if k >= parse_time(entry["at"])), default=None)
            inside += kill is not None and answered_at >= kill
    return inside


def committed_attempts(database: Path) -> dict[str, float]:
    """intuit_tid -> when the daemon had read the answer (started_at + duration), committed."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute(
            "SELECT intuit_tid, started_at, duration_ms FROM refresh_attempts "
            "WHERE outcome = 'success' AND intuit_tid IS NOT NULL"
        ).fetchall()
    return {tid: parse_time(started) + duration / 1000 for tid, started, duration in rows}


def daemon_side_window(daemon: DaemonProcess, committed: dict[str, float]) -> list[float]:
    """Seconds from the daemon having read Intuit's answer to its ``refresh.succeeded`` line."""
    return [
        parse_time(event["timestamp"]) - committed[event["intuit_tid"]]
        for event in daemon.events()
        if event.get("event") == "refresh.succeeded" and event.get("intuit_tid") in committed
    ]


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "n": len(seconds),
        "p50": round(percentile(seconds, 50) * 1000, 2),
        "p99": round(percentile(seconds, 99) * 1000, 2),
        "max": round(max(seconds, default=float("nan")) * 1000, 2),
    }
