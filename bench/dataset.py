"""The benchmark's accounts: real simulator grants, stored through the storage layer.

The simulator mints the connections in bulk (``POST /_sim/grants {"count": N}``),
:func:`build_database` stores them encrypted in one base database (rows made by
the engine's import rule and the store's row mapper), and
each phase works on a copy whose timers are set for its scenario
(:func:`retime`): which accounts are overdue, which fall due during the run,
and the rest far enough ahead that nothing else fires. Refresh tokens do not
rotate within the run (the simulator rotates after a day), so one grant serves
the daemon, the bare client and the cron batch alike.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from qbo_daemon.config.load import default_config
from qbo_daemon.core.models import ImportItem, iso
from qbo_daemon.engine.policy import RefreshPolicy
from qbo_daemon.store.crypto import Cipher, EncryptionKey
from qbo_daemon.store.repository import Storage

GRANTS_PER_CALL = 10_000  # the simulator's MAX_BULK_GRANTS
INSERT_CHUNK = 10_000
LEAD = timedelta(minutes=10)
# Accounts not in a phase's scenario fall due this far ahead: never within a run.
IDLE_DUE = (timedelta(minutes=40), timedelta(minutes=55))
# Intuit's 5-year limit, as on every row the daemon has refreshed once.
HARD_EXPIRY = timedelta(days=4 * 365)


@dataclass(frozen=True, slots=True)
class Grant:
    account_id: str
    realm_id: str
    access_token: str
    refresh_token: str


async def mint_grants(session: aiohttp.ClientSession, sim_url: str, count: int) -> list[Grant]:
    """``count`` connections from the simulator, named ``acct-000000`` onwards."""
    grants: list[Grant] = []
    while len(grants) < count:
        want = min(GRANTS_PER_CALL, count - len(grants))
        async with session.post(f"{sim_url}/_sim/grants", json={"count": want}) as answer:
            answer.raise_for_status()
            body = await answer.json()
        for item in body["grants"]:
            grants.append(
                Grant(
                    account_id=f"acct-{len(grants):06d}",
                    realm_id=item["realm_id"],
                    access_token=item["access_token"],
                    refresh_token=item["refresh_token"],
                )
            )
    return grants


def cipher_from(key_file: Path) -> Cipher:
    """The store's cipher under the key written to ``key_file`` (the bench's own key)."""
    return Cipher([EncryptionKey.from_text(key_file.read_text(encoding="utf-8"))])


async def build_database(path: Path, key: str, grants: Sequence[Grant]) -> None:
    """Store every grant (tokens encrypted) with its timer far ahead, in a new file.

    Through the store's own bulk path (``Storage.insert_accounts``: one statement and
    one transaction per chunk; the daemon's upsert takes a round trip per row, too
    slow for 100,000), so the rows are what the store under test writes, and
    ``bench.ab`` can build them for an older tree with this bench.
    """
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    now = datetime.now(UTC)
    rng = random.Random(7)
    cipher = Cipher([EncryptionKey.from_text(key)])
    policy = RefreshPolicy(replace(default_config({}).refresh, lead=LEAD))
    storage = await Storage.open(path, cipher)  # the schema, as the daemon makes it
    try:
        for start in range(0, len(grants), INSERT_CHUNK):
            accounts = [
                policy.imported(
                    ImportItem(
                        account_id=grant.account_id,
                        realm_id=grant.realm_id,
                        refresh_token=grant.refresh_token,
                        access_token=grant.access_token,
                        token_expires_at=now + _idle_delay(rng) + LEAD,
                    ),
                    now=now,
                )
                for grant in grants[start : start + INSERT_CHUNK]
            ]
            await storage.insert_accounts(accounts)
    finally:
        await storage.close()


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy through SQLite's backup API (WAL files included)."""
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    target.chmod(0o600)


def retime(path: Path, due: Mapping[str, datetime], *, seed: int = 11) -> None:
    """Set every account's timer: those in ``due`` at their instant, the rest far ahead.

    ``token_expires_at`` follows as ``due + lead`` and the 5-year hard expiry is
    set, so the rows look like the daemon's own after a refresh; only time
    columns change (no secret is touched).
    """
    now = datetime.now(UTC)
    hard = iso(now + HARD_EXPIRY)
    rng = random.Random(seed)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        ids = [row[0] for row in db.execute("SELECT account_id FROM accounts")]
        rows = []
        for account_id in ids:
            at = due.get(account_id) or now + _idle_delay(rng)
            rows.append((iso(at), iso(at + LEAD), hard, account_id))
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "UPDATE accounts SET reconnect_token_at = ?, token_expires_at = ?, "
            "refresh_token_hard_expires_at = ? WHERE account_id = ?",
            rows,
        )
        db.execute("COMMIT")


def _idle_delay(rng: random.Random) -> timedelta:
    low, high = IDLE_DUE
    return low + (high - low) * rng.random()
