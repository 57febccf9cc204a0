"""How fast the status page answers at 100,000 accounts: ``python -m bench.ui_pages``.

Builds a database of N real simulator grants (``bench.dataset``), gives a few
percent of them trouble (expired and retrying, needs reconnect, disconnected,
near the 5-year limit) and fills the attempts table, starts the real daemon on
it in this process, signs in over HTTP and times each page as a browser fetches
it (request sent to body read, median and slowest of ``--runs``). With
``--write-docs`` the table replaces the status page section of
docs/performance.md, so the figures there are the ones this code measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import sqlite3
import statistics
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from bench.dataset import build_database, mint_grants
from bench.report import machine
from qbo_daemon.cli.demo import free_port, simulator_config_text
from qbo_daemon.config.load import load_config
from qbo_daemon.core.models import iso
from qbo_daemon.runtime.daemon import Daemon
from qbo_daemon.runtime.logs import configure_logging
from qbo_daemon.simulator.app import IntuitSimulator, SimulatorSettings
from qbo_daemon.store.crypto import generate_key

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BEGIN, END = "<!-- ui-pages:begin -->", "<!-- ui-pages:end -->"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_NEXT = re.compile(r'href="([^"]+)" rel="next"')


def _trouble(path: Path, seed: int = 5) -> dict[str, str]:
    """Give some accounts trouble and fill the attempts table; returns sample ids."""
    now = datetime.now(UTC)
    rng = random.Random(seed)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        ids = [row[0] for row in db.execute("SELECT account_id FROM accounts ORDER BY id")]
        expired, revoked, gone, hard = [], [], [], []
        for account_id in ids:
            draw = rng.random()
            if draw < 0.02:
                failed = iso(now - timedelta(seconds=rng.randrange(5, 3600)))
                expired.append((rng.randrange(1, 9), failed, account_id))
            elif draw < 0.03:
                revoked.append((iso(now - timedelta(hours=rng.randrange(1, 48))), account_id))
            elif draw < 0.04:
                gone.append((account_id,))
            elif draw < 0.041:
                hard.append((iso(now + timedelta(days=rng.randrange(1, 30))), account_id))
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "UPDATE accounts SET status = 'expired', failure_count = ?, last_failure_at = ?, "
            "token_expires_at = last_failure_at, "
            "last_error = 'Intuit token call answered HTTP 503 with an HTML page' "
            "WHERE account_id = ?",
            expired,
        )
        db.executemany(
            "UPDATE accounts SET status = 'needs_reconnect', failure_count = 1, "
            "last_failure_at = ?, last_error = 'Intuit refused the grant (invalid_grant)' "
            "WHERE account_id = ?",
            revoked,
        )
        db.executemany(
            "UPDATE accounts SET status = 'disconnected', access_token = NULL, "
            "refresh_token = NULL, reconnect_token_at = NULL WHERE account_id = ?",
            gone,
        )
        db.executemany(
            "UPDATE accounts SET refresh_token_hard_expires_at = ? WHERE account_id = ?", hard
        )
        # A full attempts table (its default bound), spread over the last three hours.
        attempts = []
        for n in range(len(ids)):
            at = now - timedelta(seconds=10800 * (1 - n / len(ids)))
            ok = rng.random() > 0.03
            attempts.append(
                (rng.choice(ids), iso(at), "success" if ok else "transient", 80 + rng.random() * 90)
            )
        db.executemany(
            "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms) "
            "VALUES (?, ?, ?, ?)",
            attempts,
        )
        db.execute("COMMIT")
        realm_row = db.execute("SELECT account_id FROM accounts ORDER BY id DESC LIMIT 1")
        last = realm_row.fetchone()[0]
    return {
        "expired": expired[0][2] if expired else ids[0],
        "revoked": revoked[0][1] if revoked else ids[0],
        "last": last,
    }


async def _sign_in(http: aiohttp.ClientSession, base: str, key: str) -> None:
    async with http.get(base + "/ui/login") as page:
        token = _CSRF.search(await page.text())
    assert token is not None
    async with http.post(
        base + "/ui/login",
        data={"csrf": token.group(1), "key": key, "next": "/ui/"},
        allow_redirects=False,
    ) as answer:
        assert answer.status == 303, await answer.text()


async def _time(http: aiohttp.ClientSession, url: str, runs: int) -> tuple[list[float], str]:
    times = []
    body = ""
    for _ in range(runs):
        started = time.perf_counter()
        async with http.get(url, allow_redirects=False) as answer:
            body = await answer.text()
            assert answer.status == 200, (url, answer.status)
        times.append((time.perf_counter() - started) * 1000)
    return times, body


async def measure(accounts: int, runs: int, workdir: Path) -> dict[str, Any]:
    configure_logging("json", "error")
    simulator = IntuitSimulator(SimulatorSettings())
    await simulator.start()
    try:
        data_dir = workdir / "daemon"
        data_dir.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        api_key = "bench-" + generate_key()[:20]
        built = time.perf_counter()
        async with aiohttp.ClientSession() as http:
            grants = await mint_grants(http, simulator.base_url, accounts)
        database = data_dir / "qbo-daemon.sqlite3"
        await build_database(database, key, grants)
        samples = _trouble(database)
        samples["realm"] = grants[-1].realm_id
        build_s = time.perf_counter() - built
        config_path = data_dir / "config.toml"
        config_path.write_text(
            simulator_config_text(
                simulator,
                data_dir=data_dir,
                api_port=free_port(),
                callback_port=free_port(),
                api_key=api_key,
                encryption_key=key,
                log_level="error",
            ),
            encoding="utf-8",
        )
        config = load_config(config_path, {})
        daemon = Daemon(config)
        stop = asyncio.Event()
        running = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.ready.wait(), 60)
        try:
            return await _pages(config.api.url, api_key, samples, runs, build_s, accounts)
        finally:
            stop.set()
            await running
    finally:
        await simulator.close()


async def _pages(
    base: str, api_key: str, samples: dict[str, str], runs: int, build_s: float, accounts: int
) -> dict[str, Any]:
    jar = aiohttp.CookieJar(unsafe=True)  # the session cookie, for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await _sign_in(http, base, api_key)
        assert jar.filter_cookies(URL(base + "/ui/"))
        pages = [
            ("overview (counts, charts, next due)", "/ui/"),
            ("accounts, first page, by next refresh", "/ui/accounts"),
            ("accounts, first page, by last failure", "/ui/accounts?sort=last_failure"),
            ("accounts, first page, by failure count", "/ui/accounts?sort=failures"),
            ("accounts, needs reconnect only", "/ui/accounts?status=needs_reconnect"),
            ("accounts, expired only, by failures", "/ui/accounts?status=expired&sort=failures"),
            ("accounts, search by account id prefix", "/ui/accounts?q=acct-0999"),
            (
                "accounts, search by realm id",
                f"/ui/accounts?q={samples['realm']}",
            ),
            ("one account (times, attempts, chart)", f"/ui/accounts/{samples['expired']}"),
        ]
        results = []
        first_body = ""
        for label, path in pages:
            times, body = await _time(http, base + path, runs)
            if path == "/ui/accounts":
                first_body = body
            if "q=" in path and samples["realm"] in path:
                assert samples["last"] in body, "the realm search did not find its account"
            results.append({"page": label, "path": path, "ms": times})
        # Deep pages: follow "next" 200 times from the first page (10,000 rows in).
        url = base + "/ui/accounts"
        body = first_body
        deep = []
        for _ in range(200):
            found = _NEXT.search(body)
            if found is None:
                break
            url = base + found.group(1).replace("&amp;", "&")
            times, body = await _time(http, url, 1)
            deep.extend(times)
        results.append({"page": f"accounts, next page, {len(deep)} pages in a row", "ms": deep})
    return {
        "accounts": accounts,
        "runs": runs,
        "build_s": round(build_s, 1),
        "machine": machine(),
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "pages": results,
    }


def table(results: dict[str, Any]) -> str:
    lines = [f"{'page':<54} {'first':>9} {'median':>9} {'slowest':>9}"]
    for row in results["pages"]:
        ms = row["ms"]
        lines.append(
            f"{row['page']:<54} {ms[0]:>6.1f} ms {statistics.median(ms):>6.1f} ms "
            f"{max(ms):>6.1f} ms"
        )
    return "\n".join(lines)


def docs_section(results: dict[str, Any]) -> str:
    m = results["machine"]
    return (
        f"{BEGIN}\n"
        f"Measured by `python -m bench.ui_pages --write-docs`, {results['when']}: "
        f"{results['accounts']:,} accounts, each page fetched {results['runs']} times over "
        f"loopback with a signed-in session, from request to the last byte of HTML; "
        f"{m['cores']} cores ({m['cpu'] or 'unknown CPU'}), Python {m['python']}, "
        f"SQLite {m['sqlite']}.\n\n"
        f"```\n{table(results)}\n```\n"
        f"{END}"
    )


def write_docs(results: dict[str, Any], path: Path = DOCS) -> None:
    text = path.read_text(encoding="utf-8")
    section = docs_section(results)
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## The status page\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ui_pages", description=__doc__)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="fetches of each page")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the database here")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results = asyncio.run(measure(args.accounts, args.runs, workdir))
    print(f"{results['accounts']} accounts, database built in {results['build_s']} s")
    print(table(results))
    if args.write_docs:
        write_docs(results)
        print(f"written to {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
