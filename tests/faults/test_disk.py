"""A database that cannot be written after Intuit answered: hold the tokens, retry, never go back.

The full disk is ``RLIMIT_FSIZE`` set on the running daemon with ``prlimit``:
every write to a regular file at or past the limit fails with EFBIG (Python
ignores SIGXFSZ), so SQLite's WAL appends and checkpoints fail as they do on a
full or read-only disk, while reads and the log pipe keep working. Other ways
were weighed: ``chmod`` does not stop root; ``PRAGMA max_page_count`` is per
connection and cannot be set from outside the daemon's process; a small
loop-mounted or tmpfs filesystem needs root and ``mount``, which CI and
developers may not have (and a WAL that already has room reuses its pages, so
a full filesystem does not fail every commit).

The simulator rotates the refresh token on every refresh, so a daemon that
forgot the new token, or presented the older one again, would get
``invalid_grant`` at once.
"""

from __future__ import annotations

import resource
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.faults.conftest import Report
from tests.faults.procs import DaemonProcess, SimulatorProcess, parse_time, wait_until

EXPIRES_IN = 3
ACCOUNTS = 4
BROKEN_FOR = 4.5  # seconds: every account refreshes at least once meanwhile
SECOND_BREAK = 8.0  # seconds: an old 30 s backoff cap would sleep past the 5 s drain


def test_write_failure_after_intuit_answered(tmp_path: Path, report: Report) -> None:
    sim = SimulatorProcess(expires_in=EXPIRES_IN, rotate_after=0.0).start()
    daemon = DaemonProcess(
        tmp_path / "daemon",
        sim,
        backoff_initial="0.5s",
        backoff_max="2s",
        refresh_extra='token_wait = "1s"',
    )
    try:
        daemon.start()
        issued: dict[str, str] = {}
        for number in range(ACCOUNTS):
            grant = sim.grant()
            issued[grant["refresh_token"]] = f"acct-{number}"
            daemon.import_grant(f"acct-{number}", grant, overdue=False)
        wait_until(lambda: ready(daemon)[0], timeout=10, what="ready")

        broken_at = time.time()
        daemon.limit_file_size(0)
        saw_unready: list[dict[str, Any]] = []
        served_from_memory: list[float] = []
        while time.time() - broken_at < BROKEN_FOR:
            ok, checks = ready(daemon)
            if not ok:
                saw_unready.append(checks)
            status, _ = daemon.api("GET", "/v1/accounts")
            assert status == 200  # reads still work
            # A token newer than the database's can only come from memory: it is served
            # at once, not after token_wait.
            status, row = daemon.api("GET", "/v1/accounts/acct-0")
            asked = time.monotonic()
            status, token = daemon.api("GET", "/v1/accounts/acct-0/token")
            waited = time.monotonic() - asked
            if status == 200:
                assert parse_time(token["expires_at"]) > time.time()
                if parse_time(token["expires_at"]) > parse_time(row["token_expires_at"]):
                    served_from_memory.append(waited)  # newer than any committed token
            else:
                # Only once the held token has died too (it cannot be refreshed meanwhile).
                assert status == 503, token
                newest = last_answer(sim.log(), issued, "acct-0")
                assert newest + EXPIRES_IN <= time.time() + 0.2, token
            time.sleep(0.2)
        answered_while_broken = [
            e
            for e in sim.log()
            if e["grant_type"] == "refresh_token"
            and e["status"] == 200
            and parse_time(e["at"]) > broken_at
        ]
        refreshed = {e["presented_refresh_token"] for e in answered_while_broken}
        assert len(refreshed) >= ACCOUNTS, "every account should have refreshed while broken"
        assert saw_unready, "/readyz stayed ready while token writes failed:\n" + "\n".join(
            daemon.lines[-40:]
        )
        assert any("token writes are failing" in str(c.get("database")) for c in saw_unready)
        assert served_from_memory
        assert max(served_from_memory) < 0.5  # token_wait is 1 s

        repaired_at = time.time()
        daemon.limit_file_size(resource.RLIM_INFINITY)
        wait_until(lambda: ready(daemon)[0], timeout=40, what="ready again")
        ready_after = time.time() - repaired_at
        # Another full round of refreshes after the repair, all with the newest tokens.
        wait_until(
            lambda: refreshes_since(sim, repaired_at) >= 2 * ACCOUNTS,
            timeout=4 * EXPIRES_IN + 30,
            what="refreshes after the repair",
        )

        # Broken again, long enough for the write's backoff to grow, then SIGTERM while
        # still broken and a repair a moment later, during the shutdown drain: the held
        # tokens must be written before the daemon exits, not dropped with it.
        second_break = time.time()
        daemon.limit_file_size(0)
        wait_until(
            lambda: held_accounts(daemon, second_break) >= ACCOUNTS,
            timeout=4 * EXPIRES_IN,
            what="every account's tokens held again",
        )
        time.sleep(max(0.0, second_break + SECOND_BREAK - time.time()))
        daemon.signal(signal.SIGTERM)
        time.sleep(1.0)
        daemon.limit_file_size(resource.RLIM_INFINITY)
        assert daemon.terminate() == 0
        log = sim.log()
        stale = stale_presentations(log, issued)
        assert not stale, stale
        assert not [e for e in log if e["error"]], "Intuit refused a refresh"
        snapshot = daemon.snapshot(tmp_path / "snapshot")
        newest_rt = newest_tokens(log, issued)
        for account_id, row in snapshot.items():
            assert row.status == "active", (account_id, row.status, row.last_error)
            assert row.refresh_token == newest_rt[account_id], f"{account_id}: not the newest token"
        events = list(daemon.events())
        persist_failed = [e for e in events if e.get("event") == "refresh.persist_failed"]
        assert persist_failed
        assert all(e["level"] == "critical" for e in persist_failed)
        assert any(e.get("event") == "refresh.persist_recovered" for e in events)
        assert not [e for e in events if e.get("event") == "refresh.tokens_lost"]
        report(
            "full_disk",
            {
                "method": "RLIMIT_FSIZE=0 via prlimit on the running daemon (EFBIG)",
                "broken_s": [BROKEN_FOR, SECOND_BREAK],
                "sigterm_while_broken": "repaired 1 s into the drain; held tokens written",
                "answers_held_in_memory": len(answered_while_broken),
                "persist_failed_logged": len(persist_failed),
                "readyz_503_polls": len(saw_unready),
                "tokens_served_from_memory": len(served_from_memory),
                "slowest_served_from_memory_s": round(max(served_from_memory), 3),
                "ready_again_after_s": round(ready_after, 2),
                "stale_presentations": 0,
                "invalid_grant": 0,
            },
        )
    finally:
        daemon.close()
        sim.close()


def ready(daemon: DaemonProcess) -> tuple[bool, dict[str, Any]]:
    status, body = daemon.api("GET", "/readyz")
    assert status in (200, 503), (status, body)
    return status == 200, body["checks"]


def held_accounts(daemon: DaemonProcess, since: float) -> int:
    """Accounts with a ``refresh.persist_failed`` line after ``since``."""
    return len(
        {
            e.get("account_id")
            for e in daemon.events()
            if e.get("event") == "refresh.persist_failed" and parse_time(e["timestamp"]) > since
        }
    )


def refreshes_since(sim: SimulatorProcess, since: float) -> int:
    return sum(
        1
        for e in sim.log()
        if e["grant_type"] == "refresh_token" and e["status"] == 200 and parse_time(e["at"]) > since
    )


def chains(log: list[dict[str, Any]], issued: dict[str, str]) -> dict[str, list[str]]:
    """Each account's refresh tokens in issue order, from the simulator's log."""
    owner = dict(issued)
    chain: dict[str, list[str]] = defaultdict(list)
    for token, account in issued.items():
        chain[account].append(token)
    for entry in log:
        if entry["grant_type"] != "refresh_token" or entry["status"] != 200:
            continue
        account = owner[entry["presented_refresh_token"]]
        new = entry["issued_refresh_token"]
        if new not in owner:
            owner[new] = account
            chain[account].append(new)
    return chain


def last_answer(log: list[dict[str, Any]], issued: dict[str, str], account_id: str) -> float:
    """When the newest successful refresh of ``account_id`` arrived at the simulator."""
    tokens = set(chains(log, issued)[account_id])
    return max(
        parse_time(e["at"])
        for e in log
        if e["grant_type"] == "refresh_token"
        and e["status"] == 200
        and e["presented_refresh_token"] in tokens
    )


def newest_tokens(log: list[dict[str, Any]], issued: dict[str, str]) -> dict[str, str]:
    return {account: tokens[-1] for account, tokens in chains(log, issued).items()}


def stale_presentations(log: list[dict[str, Any]], issued: dict[str, str]) -> list[dict[str, Any]]:
    """Refresh calls that presented a token older than one already issued for the account."""
    owner = dict(issued)
    newest: dict[str, str] = {account: token for token, account in issued.items()}
    stale = []
    for entry in log:
        if entry["grant_type"] != "refresh_token":
            continue
        presented = entry["presented_refresh_token"]
        account = owner.get(presented)
        if account is None or presented != newest[account]:
            stale.append(entry)
            continue
        new = entry["issued_refresh_token"]
        if entry["status"] == 200 and new:
            owner[new] = account
            newest[account] = new
    return stale
