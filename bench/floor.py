"""The floor: the least work the daemon's design must do per refresh.

``python -m bench.floor --db PATH --key-file PATH --url TOKEN_URL --accounts FILE
--concurrency C --log PATH --out FILE`` refreshes each account in ``FILE`` (a JSON
list of account ids), ``C`` at a time, doing only what the contract asks of every
refresh and nothing of ours beyond the cipher:

- read the row (the reads asked for in one turn of the loop go out as one query,
  on a reader thread of their own),
- decrypt the refresh token (AES-GCM, :class:`~qbo_daemon.store.crypto.Cipher`),
- the same request as the bare client (:mod:`bench.ceiling`), its JSON parsed,
- encrypt the new access token (and the refresh token when Intuit rotated it),
- a compare-and-swap ``UPDATE`` of the columns a refresh changes and the
  attempt's ``INSERT``, committed durably (WAL, ``synchronous=FULL``) before
  the refresh counts; the writes waiting meanwhile share one transaction on a
  writer thread,
- one JSON log line, flushed as it is written.

The refreshes run in the daemon's shape: 2C attempts, each holding one of C
slots only for its call to Intuit, so half of them commit while the others
call and more writes share each commit. No scheduler, no task per refresh, no
timers, no metrics, no retries, no error paths. Its CPU per refresh, set
against the bare client's, is the least the daemon's design could show: what
is above it is ours. It is not a bound on every design: one that waits to
gather more writes into each commit, reads on the event loop's thread, or
keeps fewer indexes (the status page's) spends less. Writes ``{"count", "ok",
"elapsed", "cpu"}`` measured over the refreshing only, as the ceiling does.

``--without read`` reads every row before the clock starts (a design that kept
all rows in memory and trusted the compare-and-swap to catch other writers);
``--without log`` writes no line. They show what each part of the floor costs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp

from bench.ceiling import add_client_options, headers
from bench.dataset import cipher_from
from qbo_daemon.store.crypto import Cipher

LEAD = timedelta(minutes=10)  # the daemon's default [refresh] lead
GATHER_SECONDS = 0.002  # the daemon's wait for more writes to share a commit (store/sqlite.py)
UPDATE = (
    "UPDATE accounts SET access_token = ?, refresh_token = ?, token_expires_at = ?, "
    "reconnect_token_at = ?, refresh_token_expires_at = ?, last_refreshed_at = ?, "
    "updated_at = ?, version = ? WHERE account_id = ? AND version = ?"
)
INSERT_ATTEMPT = (
    "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms, "
    "intuit_tid, error) VALUES (?, ?, 'success', ?, ?, NULL)"
)

READ_COLUMNS = "account_id, refresh_token, version"

Row = tuple[str, str, int]  # account_id, sealed refresh token, version


def _marks(count: int) -> str:
    return ", ".join("?" * count)


class _Worker:
    """A thread that runs one batch at a time and hands its result to the loop in one call."""

    def __init__(self, db_path: Path, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._db_path = db_path
        self._loop = loop
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        self._jobs.put(item)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        db = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        try:
            while (first := self._jobs.get()) is not None:
                self.gather()
                batch = [first]
                while True:
                    try:
                        batch.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                closing = None in batch
                batch = [item for item in batch if item is not None]
                try:
                    done = self.handle(db, batch)
                except Exception as exc:  # the refreshes waiting on it fail, not hang
                    if db.in_transaction:
                        db.rollback()
                    done = functools.partial(_fail, batch, exc)
                self._loop.call_soon_threadsafe(done)
                if closing:
                    return
        finally:
            db.close()

    def gather(self) -> None:
        """Called when a first item arrives, before the ones behind it are taken."""

    def handle(self, db: sqlite3.Connection, batch: list[Any]) -> Callable[[], None]:
        raise NotImplementedError


def _fail(batch: list[tuple[Any, asyncio.Future[Any]]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


class _Reader(_Worker):
    """Reads rows by account id: every id asked for meanwhile goes in one ``IN (...)``."""

    def handle(self, db: sqlite3.Connection, batch: list[Any]) -> Callable[[], None]:
        ids = [account_id for account_id, _ in batch]
        # Only "?" placeholders are joined into the statement.
        wanted = f"SELECT {READ_COLUMNS} FROM accounts WHERE account_id IN ({_marks(len(ids))})"  # noqa: S608
        found = {row[0]: row for row in db.execute(wanted, ids)}

        def done() -> None:
            for account_id, future in batch:
                if not future.done():
                    future.set_result(found.get(account_id))

        return done


class _Writer(_Worker):
    """Commits every write queued meanwhile in one transaction (a group commit).

    As the daemon's writer does, it waits ``GATHER_SECONDS`` after a write arrives
    for the writes behind it.
    """

    def gather(self) -> None:
        time.sleep(GATHER_SECONDS)

    def handle(self, db: sqlite3.Connection, batch: list[Any]) -> Callable[[], None]:
        db.execute("BEGIN IMMEDIATE")
        matched = db.executemany(UPDATE, [write[0] for write, _ in batch]).rowcount
        if matched != len(batch):
            # A stale compare-and-swap: nothing of the batch is kept (no one else writes
            # these rows during a run, so this is a defect of the run, not a race).
            db.rollback()
            raise RuntimeError(f"{len(batch) - matched} stale compare-and-swap writes")
        db.executemany(INSERT_ATTEMPT, [write[1] for write, _ in batch])
        db.execute("COMMIT")

        def done() -> None:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

        return done


async def drive(
    db_path: Path,
    cipher: Cipher,
    url: str,
    accounts: list[str],
    concurrency: int,
    fixed: dict[str, str],
    log: TextIO | None,
    *,
    keep_rows: bool = False,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    kept: dict[str, Row] | None = None
    if keep_rows:
        with closing(sqlite3.connect(db_path)) as db:
            kept = {row[0]: row for row in db.execute(f"SELECT {READ_COLUMNS} FROM accounts")}  # noqa: S608
    reader, writer = _Reader(db_path, "reader", loop), _Writer(db_path, "writer", loop)
    pending: Iterator[str] = iter(accounts)
    ok = 0
    connector = aiohttp.TCPConnector(limit=max(100, concurrency * 2))
    calls = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=30)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def refresh(account_id: str) -> bool:
            if kept is not None:
                row = kept.get(account_id)
            else:
                wanted: asyncio.Future[Row | None] = loop.create_future()
                reader.submit((account_id, wanted))
                row = await wanted
            if row is None:
                return False
            _, sealed, version = row
            token = cipher.decrypt(
                sealed, table="accounts", column="refresh_token", row_key=account_id
            )
            data = urlencode({"grant_type": "refresh_token", "refresh_token": token}).encode()
            started = datetime.now(UTC)
            began = time.monotonic()
            async with (
                calls,
                session.post(url, data=data, headers=fixed, allow_redirects=False) as answer,
            ):
                body = await answer.read()
                tid = answer.headers.get("intuit_tid")
            duration_ms = (time.monotonic() - began) * 1000
            tokens = json.loads(body) if answer.status == 200 else {}
            if not tokens.get("access_token"):
                return False
            expires = started + timedelta(seconds=int(tokens["expires_in"]))
            dies = started + timedelta(seconds=int(tokens["x_refresh_token_expires_in"]))
            sealed_access = cipher.encrypt(
                tokens["access_token"], table="accounts", column="access_token", row_key=account_id
            )
            rotated = tokens.get("refresh_token") or token
            if rotated != token:  # Intuit rotated it: the new one is what must be kept
                sealed = cipher.encrypt(
                    rotated, table="accounts", column="refresh_token", row_key=account_id
                )
            now = started.isoformat()
            update = (
                sealed_access,
                sealed,
                expires.isoformat(),
                (expires - LEAD).isoformat(),
                dies.isoformat(),
                now,
                now,
                version + 1,
                account_id,
                version,
            )
            written: asyncio.Future[None] = loop.create_future()
            writer.submit(((update, (account_id, now, duration_ms, tid)), written))
            await written
            line = {
                "timestamp": datetime.now(UTC).isoformat(),
                "level": "info",
                "logger": "qbo_daemon.refresh",
                "event": "refresh.succeeded",
                "account_id": account_id,
                "trigger": "scheduled",
                "duration_ms": round(duration_ms, 1),
                "next_due": update[3],
                "token_expires_at": update[2],
                "intuit_tid": tid,
            }
            if log is not None:
                log.write(json.dumps(line) + "\n")
                log.flush()
            return True

        async def worker() -> None:
            nonlocal ok
            for account_id in pending:
                if await refresh(account_id):
                    ok += 1

        started_wall, started_cpu = time.time(), time.process_time()
        # The daemon's shape: twice as many attempts as calls to Intuit, each holding a
        # call slot only for its call, so half of them commit while the others call.
        await asyncio.gather(*(worker() for _ in range(2 * concurrency)))
        elapsed, cpu = time.time() - started_wall, time.process_time() - started_cpu
    reader.close()
    writer.close()
    return {"count": len(accounts), "ok": ok, "elapsed": elapsed, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    add_client_options(parser)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--accounts", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument(
        "--without", action="append", choices=("read", "log"), default=[], help="leave a part out"
    )
    args = parser.parse_args()
    cipher = cipher_from(args.key_file)
    accounts = json.loads(args.accounts.read_text(encoding="utf-8"))
    fixed = headers(args.client_id, args.client_secret)
    with args.log.open("a", encoding="utf-8") as log:
        result = asyncio.run(
            drive(
                args.db,
                cipher,
                args.url,
                accounts,
                args.concurrency,
                fixed,
                None if "log" in args.without else log,
                keep_rows="read" in args.without,
            )
        )
    args.out.write_text(json.dumps(result), encoding="utf-8")
    if result["ok"] != result["count"]:
        print(f"floor: {result['ok']} of {result['count']} refreshed", file=sys.stderr)


if __name__ == "__main__":
    main()
