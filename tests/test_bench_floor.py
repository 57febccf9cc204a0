"""``bench.floor`` does the work it stands for: each refresh durable, a rotated token kept.

The floor is a measurement (docs/performance.md); a floor that skipped part of the
contract's work would understate it. Run in this process against the simulator,
on a database built as the bench builds it.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import aiohttp

from bench.ceiling import headers
from bench.dataset import build_database, mint_grants
from bench.floor import drive
from qbo_daemon.simulator.app import IntuitSimulator
from qbo_daemon.simulator.settings import SimulatorSettings
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key

ACCOUNTS = 6


async def test_the_floor_keeps_each_rotated_refresh_token(tmp_path: Path) -> None:
    sim = IntuitSimulator(SimulatorSettings(rotate_after=0))  # every refresh rotates
    await sim.start()
    try:
        async with aiohttp.ClientSession() as session:
            grants = await mint_grants(session, sim.base_url, ACCOUNTS)
        key = generate_key()
        database = tmp_path / "floor.sqlite3"
        await build_database(database, key, grants)
        cipher = Cipher([EncryptionKey.from_text(key)])
        fixed = headers(sim.settings.client_id, sim.settings.client_secret)
        accounts = [grant.account_id for grant in grants]

        first = await drive(database, cipher, sim.token_endpoint, accounts, 2, fixed, None)
        # The second pass presents what the first one stored: only the rotated tokens work.
        second = await drive(database, cipher, sim.token_endpoint, accounts, 2, fixed, None)
    finally:
        await sim.close()

    assert (first["ok"], second["ok"]) == (ACCOUNTS, ACCOUNTS)
    originals = {grant.account_id: grant.refresh_token for grant in grants}
    with closing(sqlite3.connect(database)) as db:
        rows = db.execute("SELECT account_id, refresh_token FROM accounts").fetchall()
        attempts = db.execute(
            "SELECT COUNT(*) FROM refresh_attempts WHERE outcome = 'success'"
        ).fetchone()[0]
    assert attempts == 2 * ACCOUNTS
    for account_id, sealed in rows:
        kept = cipher.decrypt(sealed, table="accounts", column="refresh_token", row_key=account_id)
        assert kept != originals[account_id]
