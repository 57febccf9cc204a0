"""``qbo-daemon migrate-storage`` as an operator runs it: a subprocess, a real SQLite file,
a real PostgreSQL database (tests/pg.py), daemons stopped; and what it refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from qbo_daemon.core.errors import OAuthStateError, RealmConflictError
from qbo_daemon.core.models import AccountStatus, ImportItem, TokenSet
from qbo_daemon.store.crypto import Cipher, EncryptionKey, generate_key
from qbo_daemon.store.lock import DatabaseLock
from qbo_daemon.store.postgres.storage import PostgresStorage
from qbo_daemon.store.repository import Attempt, ClaimedState, RealmPolicy, Storage
from qbo_daemon.store.schema import sha256_hex
from qbo_daemon.store.states import answer_hash
from tests.store.writes import (
    forget_tokens,
    import_accounts,
    record_failure,
    save_checked_connection,
    save_connection,
    save_refresh,
)

QBO = [sys.executable, "-m", "qbo_daemon"]
ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("QBO_", "CREDENTIALS_"))}
NOW = datetime(2025, 3, 1, 12, tzinfo=UTC)
LEAD = timedelta(minutes=10)
SECRETS = (
    "REFRESH-0-",
    "ACCESS-0-",
    "REALM-77",
    "state-open",
    "PKCE-verifier-",
)  # prefixes of every token stored below
PASSWORD = "pg-Pass-Word-9"
VERIFIER = "PKCE-verifier-" + "v" * 50


def tokens(n: int, at: datetime = NOW) -> TokenSet:
    return TokenSet(
        access_token=f"ACCESS-0-{n}",
        refresh_token=f"REFRESH-0-{n}",
        obtained_at=at,
        token_expires_at=at + timedelta(hours=1),
        refresh_token_expires_at=at + timedelta(days=100),
        refresh_token_hard_expires_at=at + timedelta(days=1500) if n % 2 else None,
    )


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def config(tmp_path: Path, key: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nencryption_keys = ["{key}"]\n', encoding="utf-8")
    return path


async def fill(storage: Storage | PostgresStorage) -> None:
    """Accounts in every status, OAuth states, refresh attempts."""
    await import_accounts(
        storage,
        [ImportItem(f"bulk-{n:03d}", "REALM-77", f"REFRESH-0-b{n}") for n in range(120)],
        now=NOW,
    )
    for n in range(6):
        account = await save_connection(storage, f"acct-{n}", f"REALM-77{n}", tokens(n), now=NOW)
        if n == 1:
            account = await save_refresh(
                storage,
                account,
                tokens(10 + n),
                now=NOW,
                attempt=Attempt(account.account_id, NOW, "success", 120.25, intuit_tid="tid-1"),
            )
        if n == 2:
            await record_failure(
                storage,
                account,
                status=AccountStatus.NEEDS_RECONNECT,
                error="invalid_grant",
                now=NOW,
                attempt=Attempt(account.account_id, NOW, "invalid_grant", 88.5, error="x"),
            )
        if n == 3:
            await forget_tokens(storage, account, now=NOW)
    # A callback whose realm check did not finish: stored unverified, through the realm rules.
    await save_checked_connection(
        storage,
        "acct-unverified",
        "REALM-7799",
        tokens(6),
        now=NOW,
        policy=RealmPolicy(),
        realm_verified=False,
    )
    ttl = timedelta(minutes=10)
    await storage.create_state(
        "state-open", "acct-9", now=NOW, ttl=ttl, code_verifier=VERIFIER, allow_realm_change=True
    )
    await storage.create_state("state-used", "acct-0", now=NOW, ttl=ttl)
    await storage.consume_state("state-used", answer_hash("code-1", None), now=NOW)
    await storage.finish_state("state-used", "connected")


def sqlite_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
            for table in ("accounts", "oauth_states", "refresh_attempts")
        }


async def migrate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [*QBO, "migrate-storage", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def with_password(url: str) -> str:
    """``url`` with a password in it (the server trusts any, so it still connects)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


async def test_sqlite_to_postgres_and_back_keeps_every_row(
    tmp_path: Path, pg_url: str, config: Path, key: str
) -> None:
    cipher = Cipher([EncryptionKey.from_text(key)])
    original = tmp_path / "original.sqlite3"
    storage = await Storage.open(original, cipher)
    await fill(storage)
    before = await storage.list_accounts()
    tokens_before = [await storage.load(a.account_id) for a in before]
    await storage.close()

    there = await migrate(config, "--from", str(original), "--to", with_password(pg_url))
    assert there.returncode == 0, there.stderr
    assert "copied 127 accounts, 2 OAuth states and 2 refresh attempts" in there.stdout
    assert "verified: the same rows on both sides; every secret decrypts" in there.stdout
    output = there.stdout + there.stderr
    assert PASSWORD not in output
    assert "postgres:********@127.0.0.1" in output
    for secret in SECRETS:
        assert secret not in output

    # The daemon's view on PostgreSQL is the same, tokens and all.
    postgres = await PostgresStorage.open(pg_url, cipher)
    try:
        assert await postgres.list_accounts() == before
        assert [await postgres.load(a.account_id) for a in before] == tokens_before
        assert await postgres.status_counts() == {
            "active": 125,
            "needs_reconnect": 1,
            "disconnected": 1,
        }
        assert [a.intuit_tid for a in await postgres.attempts("acct-1")] == ["tid-1"]
        assert (await postgres.load("acct-unverified")).realm_verified is False
        # The copied states keep their rules: the used one remembers its answer, the open one
        # its verifier (bound to its row, so it decrypts only there) and its permission.
        with pytest.raises(OAuthStateError) as replayed:
            await postgres.consume_state("state-used", answer_hash("code-1", None), now=NOW)
        assert replayed.value.reason == "replayed"
        claim = await postgres.consume_state("state-open", answer_hash("code-2", None), now=NOW)
        assert claim == ClaimedState("acct-9", allow_realm_change=True, code_verifier=VERIFIER)
        # The realm rules find the copied digests.
        with pytest.raises(RealmConflictError):
            await save_checked_connection(
                postgres,
                "intruder",
                "REALM-7799",
                tokens(7),
                now=NOW,
                policy=RealmPolicy(),
                realm_verified=True,
            )
        # New rows go on after the copied ids.
        added = await save_connection(postgres, "new", "REALM-77", tokens(5), now=NOW)
        assert added.id > max(a.id for a in before)
    finally:
        await postgres.close()

    back = tmp_path / "back.sqlite3"
    config_back = await migrate(config, "--from", pg_url, "--to", str(back))
    assert config_back.returncode == 0, config_back.stderr
    copied = sqlite_tables(back)
    expected = sqlite_tables(original)
    assert copied["accounts"][:-1] == expected["accounts"]  # byte for byte, ciphertext too
    assert copied["refresh_attempts"] == expected["refresh_attempts"]
    # The states as they were, but "state-open", used on PostgreSQL meanwhile.
    opened = sha256_hex("state-open")
    assert [s for s in copied["oauth_states"] if s[0] != opened] == [
        s for s in expected["oauth_states"] if s[0] != opened
    ]
    assert sorted(s[0] for s in copied["oauth_states"]) == sorted(
        sha256_hex(s) for s in ("state-open", "state-used")
    )
    assert copied["accounts"][-1][1] == "new"


async def test_a_non_empty_target_is_refused_and_left_alone(
    tmp_path: Path, pg_url: str, config: Path, key: str
) -> None:
    cipher = Cipher([EncryptionKey.from_text(key)])
    source = tmp_path / "qbo.sqlite3"
    storage = await Storage.open(source, cipher)
    await fill(storage)
    await storage.close()
    target = await PostgresStorage.open(pg_url, cipher)
    kept = await save_connection(target, "already-here", "REALM-77", tokens(1), now=NOW)
    await target.close()

    result = await migrate(config, "--from", str(source), "--to", pg_url)
    assert result.returncode == 1
    assert "is not empty (1 accounts); nothing copied" in result.stderr
    target = await PostgresStorage.open(pg_url, cipher)
    try:
        assert [a.account_id for a in await target.list_accounts()] == ["already-here"]
        assert await target.load("already-here") == kept
    finally:
        await target.close()


async def test_running_daemons_are_refused(
    tmp_path: Path, pg_url: str, config: Path, key: str
) -> None:
    cipher = Cipher([EncryptionKey.from_text(key)])
    source = tmp_path / "qbo.sqlite3"
    storage = await Storage.open(source, cipher)
    await fill(storage)
    await storage.close()

    with DatabaseLock(source):  # a daemon on the SQLite file
        result = await migrate(config, "--from", str(source), "--to", pg_url)
    assert result.returncode == 1
    assert f"a qbo-daemon is running on {source}: stop it before migrating" in result.stderr

    daemon = await PostgresStorage.open(pg_url, cipher)  # a daemon on the database
    try:
        result = await migrate(config, "--from", str(source), "--to", pg_url)
    finally:
        await daemon.close()
    assert result.returncode == 1
    assert "qbo-daemon connection(s) to postgresql://" in result.stderr
    assert "stop every daemon before migrating" in result.stderr
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 0
    finally:
        await conn.close()


async def test_a_row_that_does_not_decrypt_stops_it_before_anything_is_written(
    tmp_path: Path, pg_url: str, config: Path, key: str
) -> None:
    cipher = Cipher([EncryptionKey.from_text(key)])
    source = tmp_path / "qbo.sqlite3"
    storage = await Storage.open(source, cipher)
    await fill(storage)
    await storage.close()
    with contextlib.closing(sqlite3.connect(source)) as conn, conn:
        conn.execute(
            "UPDATE accounts SET refresh_token = "
            "(SELECT refresh_token FROM accounts WHERE account_id = 'acct-0') "
            "WHERE account_id = 'acct-4'"
        )

    result = await migrate(config, "--from", str(source), "--to", pg_url)
    assert result.returncode == 1
    assert "accounts.refresh_token of row 'acct-4'" in result.stderr
    assert "copied from another row" in result.stderr
    conn_pg = await asyncpg.connect(pg_url)
    try:
        assert await conn_pg.fetchval("SELECT count(*) FROM accounts") == 0
    finally:
        await conn_pg.close()

    other_key = tmp_path / "other.toml"
    other_key.write_text(f'[storage]\nencryption_keys = ["{generate_key()}"]\n')
    result = await migrate(other_key, "--from", str(source), "--to", pg_url)
    assert result.returncode == 1
    assert f"key id {cipher.primary_key_id!r}, which is not among" in result.stderr


async def test_the_configured_storage_is_the_default_side(
    tmp_path: Path, pg_url: str, key: str
) -> None:
    """The URL (and its password) can stay in the configuration, off the command line."""
    cipher = Cipher([EncryptionKey.from_text(key)])
    source = tmp_path / "qbo.sqlite3"
    storage = await Storage.open(source, cipher)
    await fill(storage)
    await storage.close()
    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nencryption_keys = ["{key}"]\nurl_file = "{tmp_path / "url"}"\n')
    (tmp_path / "url").write_text(with_password(pg_url) + "\n")

    result = await migrate(config, "--from", str(source))
    assert result.returncode == 0, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert "copied 127 accounts" in result.stdout

    neither = await migrate(config)
    assert neither.returncode == 2
    assert "give --from or --to" in neither.stderr
    missing = await migrate(config, "--from", str(tmp_path / "nope.sqlite3"))
    assert missing.returncode == 1
    assert f"no database at {tmp_path / 'nope.sqlite3'}" in missing.stderr
    assert not (tmp_path / "nope.sqlite3").exists()
