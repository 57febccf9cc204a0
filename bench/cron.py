"""The cron approach as apps run it today: one batch, one row at a time, blocking HTTP.

``python -m bench.cron --db PATH --key-file PATH --url TOKEN_URL --seconds S --out FILE
[--workers N]`` is one run of the classic every-5-minutes job (a rake task, a management
command): select the rows whose access token expires within the refresh
window, then for each one, in turn, post the refresh with ``requests`` (a new
connection per call, as Intuit's own Python client does), parse the answer,
encrypt and write the new tokens, and commit that row. It reads and writes the
daemon's own encrypted rows, so it does the same database and crypto work.

It stops after ``S`` seconds (a full batch of thousands at 100 ms a call would
take hours): throughput and CPU are steady long before. ``--workers N`` is the
threaded variant: N threads, each with its own connection, share the batch, as
a job runner with N workers would. Its lateness needs no
measurement: a row falls due at a uniformly random moment between two polls,
so it waits U(0, 5 min) for the next poll, plus its place in the batch.
"""

from __future__ import annotations

import argparse
import json
import queue
import sqlite3
import threading
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from bench.ceiling import add_client_options, headers
from bench.dataset import cipher_from
from qbo_daemon.core.models import iso
from qbo_daemon.store.crypto import Cipher

WINDOW = timedelta(minutes=10)


def run_batch(
    db_path: Path,
    cipher: Cipher,
    url: str,
    fixed: dict[str, str],
    seconds: float,
    workers: int = 1,
) -> dict[str, Any]:
    """One batch: select the due rows, then refresh them one at a time on each of ``workers``.

    ``workers`` > 1 is the threaded variant (a job runner with N threads, each
    with its own database connection), so "× cron" can compare designs at the
    same concurrency, not one thread against many coroutines.
    """
    started_wall, started_cpu = time.time(), time.process_time()
    deadline = time.monotonic() + seconds
    with closing(_connect(db_path)) as db:
        horizon = iso(datetime.now(UTC) + WINDOW)
        rows = db.execute(
            "SELECT account_id, refresh_token, realm_id, version FROM accounts "
            "WHERE status = 'active' AND token_expires_at < ? ORDER BY token_expires_at",
            (horizon,),
        ).fetchall()
    todo: queue.SimpleQueue[tuple[str, str, str, int]] = queue.SimpleQueue()
    for row in rows:
        todo.put(row)
    counts = {"done": 0, "failed": 0}
    lock = threading.Lock()

    def work() -> None:
        with closing(_connect(db_path)) as db:
            while time.monotonic() < deadline:
                try:
                    row = todo.get_nowait()
                except queue.Empty:
                    return
                ok = _refresh_row(db, cipher, url, fixed, *row)
                with lock:
                    counts["done" if ok else "failed"] += 1

    threads = [threading.Thread(target=work, name=f"cron-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "selected": len(rows),
        "refreshed": counts["done"],
        "failed": counts["failed"],
        "workers": workers,
        "started": started_wall,
        "elapsed": time.time() - started_wall,
        "cpu": time.process_time() - started_cpu,
    }


def _connect(db_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA busy_timeout = 30000")
    return db


def _refresh_row(
    db: sqlite3.Connection,
    cipher: Cipher,
    url: str,
    fixed: dict[str, str],
    account_id: str,
    sealed: str,
    sealed_realm: str,
    version: int,
) -> bool:
    """Decrypt, post, parse, encrypt and commit one row; False when Intuit said no."""
    refresh_token = cipher.decrypt(
        sealed, table="accounts", column="refresh_token", row_key=account_id
    )
    sent = datetime.now(UTC)
    answer = requests.post(
        url,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        headers=fixed,
        timeout=30,
    )
    body = answer.json() if answer.status_code == 200 else {}
    if not body.get("access_token"):
        return False
    expires = sent + timedelta(seconds=int(body["expires_in"]))
    new_refresh = body.get("refresh_token") or refresh_token
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "UPDATE accounts SET access_token = ?, refresh_token = ?, realm_id = ?, "
        "token_expires_at = ?, reconnect_token_at = ?, last_refreshed_at = ?, "
        "updated_at = ?, version = version + 1 WHERE account_id = ? AND version = ?",
        (
            _seal(cipher, body["access_token"], "access_token", account_id),
            _seal(cipher, new_refresh, "refresh_token", account_id),
            sealed_realm,
            iso(expires),
            iso(expires - WINDOW),
            iso(sent),
            iso(sent),
            account_id,
            version,
        ),
    )
    db.execute("COMMIT")
    return True


def _seal(cipher: Cipher, value: str, column: str, account_id: str) -> str:
    return cipher.encrypt(value, table="accounts", column=column, row_key=account_id)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cron")
    add_client_options(parser)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument(
        "--workers", type=int, default=1, help="threads, each with its own connection"
    )
    args = parser.parse_args()
    cipher = cipher_from(args.key_file)
    fixed = headers(args.client_id, args.client_secret)
    fixed.pop("Content-Type")  # requests sets it for a form body
    result = run_batch(args.db, cipher, args.url, fixed, args.seconds, args.workers)
    args.out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
