"""What only the PostgreSQL storage has: its schema and migrations, several daemons on one
database, notifications, identical encryption with SQLite, and a server that fails.

Each test has its own fresh database on the machine's server (tests/pg.py).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import cast

import asyncpg
import pytest

from qbo_daemon.core.errors import (
    OAuthStateError,
    RealmConflictError,
    StaleWriteError,
    StorageError,
)
from qbo_daemon.core.models import Account, AccountStatus, ImportItem
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.postgres.schema import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION
from qbo_daemon.store.postgres.storage import PostgresStorage
from qbo_daemon.store.repository import ClaimedState, RealmPolicy, Storage
from qbo_daemon.store.schema import sha256_hex
from qbo_daemon.store.states import answer_hash
from tests.store.test_repository import ACCESS, NOW, REALM, REFRESH, tokens
from tests.store.writes import (
    forget_tokens,
    import_accounts,
    record_failure,
    save_checked_connection,
    save_connection,
    save_refresh,
)

PASSWORD = "pg-Secret-42"


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def connect(storage: PostgresStorage | Storage, account_id: str = "acct-1") -> Account:
    return await save_connection(storage, account_id, REALM, tokens(), now=NOW)


# -- schema and migrations -------------------------------------------------------


async def test_a_new_database_gets_the_schema_with_the_claim_columns(
    pg_url: str, cipher: Cipher
) -> None:
    storage = await PostgresStorage.open(pg_url, cipher)
    await storage.close()
    versions = await fetch(pg_url, "SELECT version FROM schema_version ORDER BY version")
    assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))

    columns = {
        (r["table_name"], r["column_name"]): (r["data_type"], r["column_default"])
        for r in await fetch(
            pg_url,
            "SELECT table_name, column_name, data_type, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public'",
        )
    }
    # The same columns as SQLite's accounts table, times as timestamptz ...
    for column in ("token_expires_at", "reconnect_token_at", "refresh_token_hard_expires_at"):
        assert columns["accounts", column][0] == "timestamp with time zone"
    assert columns["accounts", "refresh_token"][0] == "text"
    # ... and the claim a node takes on an account before it calls Intuit.
    assert columns["accounts", "lease_owner"][0] == "text"
    assert columns["accounts", "lease_until"][0] == "timestamp with time zone"
    assert columns["accounts", "lease_generation"] == ("bigint", "0")
    assert columns["accounts", "inflight_since"][0] == "timestamp with time zone"
    assert {c for t, c in columns if t == "nodes"} == {
        "node_id",
        "host",
        "pid",
        "started_at",
        "heartbeat_at",
    }
    # SQLite's migrations 3 and 4: the status page's failure time, the realm's confirmation and
    # digest, and OAuth states kept only as hashes.
    assert columns["accounts", "last_failure_at"][0] == "timestamp with time zone"
    assert columns["accounts", "realm_verified"] == ("boolean", "true")
    assert columns["accounts", "realm_digest"][0] == "text"
    assert {c for t, c in columns if t == "oauth_states"} == {
        "state_hash",
        "account_id",
        "created_at",
        "expires_at",
        "used_at",
        "outcome",
        "answer_hash",
        "code_verifier",
        "allow_realm_change",
        "seq",
    }
    assert {c for t, c in columns if t == "refresh_attempts"} >= {"intuit_tid", "duration_ms"}

    (due,) = await fetch(pg_url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'accounts_due'")
    assert "(reconnect_token_at)" in due["indexdef"]
    assert "WHERE (status = ANY (ARRAY['active'::text, 'expired'::text]))" in due["indexdef"]


async def test_a_version_1_database_keeps_its_states_only_as_hashes_and_its_realms_findable(
    pg_url: str, cipher: Cipher
) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for statement in MIGRATIONS[0]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        realm = cipher.encrypt(REALM, table="accounts", column="realm_id", row_key="legacy-1")
        await conn.execute(
            "INSERT INTO accounts (account_id, status, realm_id, key_id, failure_count, "
            "created_at, updated_at) VALUES ('legacy-1', 'expired', $1, $2, 2, $3, $3)",
            realm,
            cipher.primary_key_id,
            NOW,
        )
        await conn.execute(
            "INSERT INTO refresh_attempts (account_id, started_at, outcome, duration_ms) "
            "VALUES ('legacy-1', $1, 'transient', 1), ('legacy-1', $2, 'success', 1)",
            NOW - timedelta(minutes=5),
            NOW,
        )
        await conn.execute(
            "INSERT INTO oauth_states (state, account_id, created_at, expires_at) "
            "VALUES ('old-state', 'legacy-2', $1, $2)",
            NOW,
            NOW + timedelta(minutes=10),
        )
    finally:
        await conn.close()

    storage = await PostgresStorage.open(pg_url, cipher)
    try:
        (row,) = await fetch(
            pg_url, "SELECT realm_verified, realm_digest, last_failure_at FROM accounts"
        )
        assert row["realm_verified"] is True
        assert row["realm_digest"].startswith(f"{cipher.primary_key_id}.")
        assert row["last_failure_at"] == NOW - timedelta(minutes=5)  # the last failed attempt
        (state,) = await fetch(pg_url, "SELECT * FROM oauth_states")
        assert state["state_hash"] == sha256_hex("old-state")
        assert "old-state" not in str(dict(state))

        claim = await storage.consume_state("old-state", answer_hash("c", None), now=NOW)
        assert claim.account_id == "legacy-2"
        # The old account holds its company against a new account id.
        with pytest.raises(RealmConflictError) as shared:
            await save_checked_connection(
                storage,
                "newcomer",
                REALM,
                tokens(),
                now=NOW,
                policy=RealmPolicy(),
                realm_verified=True,
            )
        assert (shared.value.reason, shared.value.holder) == ("shared", "legacy-1")
    finally:
        await storage.close()


async def test_daemons_starting_together_migrate_once(pg_url: str, cipher: Cipher) -> None:
    opened = await asyncio.gather(*(PostgresStorage.open(pg_url, cipher) for _ in range(5)))
    try:
        await asyncio.gather(*(connect(s, f"acct-{n}") for n, s in enumerate(opened)))
        assert await opened[0].status_counts() == {"active": 5}
    finally:
        await asyncio.gather(*(s.close() for s in opened))
    versions = await fetch(pg_url, "SELECT version FROM schema_version")
    assert sorted(r["version"] for r in versions) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_migration_waits_for_the_lock(pg_url: str, cipher: Cipher) -> None:
    """Another daemon migrating (holding the lock) holds this one's start until it is done."""
    holder = await asyncpg.connect(pg_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        opening = asyncio.create_task(PostgresStorage.open(pg_url, cipher))
        await asyncio.sleep(0.5)
        assert not opening.done()
        (found,) = await fetch(pg_url, "SELECT to_regclass('accounts') AS t")
        assert found["t"] is None
        await transaction.rollback()
        storage = await asyncio.wait_for(opening, 10)
        await storage.close()
    finally:
        await holder.close()


async def test_newer_schema_is_refused_clearly(pg_url: str, cipher: Cipher) -> None:
    storage = await PostgresStorage.open(pg_url, cipher)
    await storage.close()
    await fetch(pg_url, "INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    with pytest.raises(StorageError) as caught:
        await PostgresStorage.open(pg_url, cipher)
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this qbo-daemon" in message
    assert "upgrade qbo-daemon" in message
    assert pg_url.rsplit("/", 1)[1] in message  # names the database


# -- several daemons on one database ----------------------------------------------


async def test_two_daemons_refreshing_one_version_one_wins(pg_url: str, cipher: Cipher) -> None:
    first = await PostgresStorage.open(pg_url, cipher)
    second = await PostgresStorage.open(pg_url, cipher)
    try:
        read = await connect(first)
        results = await asyncio.gather(
            save_refresh(first, read, tokens("ACCESS-A", "REFRESH-A"), now=NOW),
            save_refresh(second, read, tokens("ACCESS-B", "REFRESH-B"), now=NOW),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, Account)]
        assert len(winners) == 1
        assert [type(r) for r in results if not isinstance(r, Account)] == [StaleWriteError]
        for storage in (first, second):
            stored = await storage.load("acct-1")
            assert (stored.version, stored.refresh_token) == (2, winners[0].refresh_token)
    finally:
        await first.close()
        await second.close()


async def test_a_state_is_used_once_across_daemons(pg_url: str, cipher: Cipher) -> None:
    first = await PostgresStorage.open(pg_url, cipher)
    second = await PostgresStorage.open(pg_url, cipher)
    try:
        await first.create_state("state-1", "acct-1", now=NOW, ttl=timedelta(minutes=10))
        results = await asyncio.gather(
            *(
                s.consume_state("state-1", answer_hash(f"code-{n}", None), now=NOW)
                for n, s in enumerate((first, second, first, second))
            ),
            return_exceptions=True,
        )
        claims = [r for r in results if isinstance(r, ClaimedState)]
        assert [c.account_id for c in claims] == ["acct-1"]
        reasons = [r.reason for r in results if isinstance(r, OAuthStateError)]
        assert reasons == ["used"] * 3
    finally:
        await first.close()
        await second.close()


async def test_every_committed_change_is_announced_to_every_daemon(
    pg_url: str, cipher: Cipher
) -> None:
    writer = await PostgresStorage.open(pg_url, cipher)
    other = await PostgresStorage.open(pg_url, cipher)
    heard: list[str] = []
    await other.listen(lambda change: heard.append(change.account_id if change else "(gap)"))

    async def announced(*expected: str) -> None:
        for _ in range(100):
            if len(heard) >= len(expected):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # and nothing more
        assert heard == list(expected)
        heard.clear()

    try:
        account = await connect(writer, "acct-1")
        await announced("acct-1")
        refreshed = await save_refresh(writer, account, tokens("A2", "R2"), now=NOW)
        await announced("acct-1")
        with pytest.raises(StaleWriteError):  # a stale write changes nothing: no news
            await save_refresh(writer, account, tokens("A3", "R3"), now=NOW)
        await announced()
        failed = await record_failure(
            writer, refreshed, status=AccountStatus.EXPIRED, error="HTTP 503", now=NOW
        )
        await announced("acct-1")
        await import_accounts(
            writer,
            [ImportItem("imp-1", REALM, "R-1"), ImportItem("imp-2", REALM, "R-2")],
            now=NOW,
        )
        await announced("imp-1", "imp-2")
        with pytest.raises(StorageError):  # a failed import announces nothing
            await import_accounts(
                writer,
                [ImportItem("imp-3", REALM, "R-3"), ImportItem(cast(str, None), REALM, "R")],
                now=NOW,
            )
        await announced()
        await forget_tokens(writer, failed, now=NOW)
        await announced("acct-1")
    finally:
        await writer.close()
        await other.close()


# -- identical encryption ----------------------------------------------------------


async def test_ciphertext_copies_between_sqlite_and_postgres_unchanged(
    tmp_path: Path, pg_url: str, cipher: Cipher
) -> None:
    sqlite = await Storage.open(tmp_path / "qbo.sqlite3", cipher)
    postgres = await PostgresStorage.open(pg_url, cipher)
    try:
        await connect(sqlite, "from-sqlite")
        await connect(postgres, "from-postgres")
        copied = await sqlite._db.fetchone(
            "SELECT realm_id, access_token, refresh_token, key_id FROM accounts "
            "WHERE account_id = 'from-sqlite'",
            (),
        )
        assert copied is not None
        assert copied["refresh_token"].startswith(f"v1.{cipher.primary_key_id}.")
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "UPDATE accounts SET account_id = 'from-sqlite', realm_id = $1, "
                "access_token = $2, refresh_token = $3, key_id = $4 "
                "WHERE account_id = 'from-postgres'",
                *tuple(copied),
            )
            back = await conn.fetchrow(
                "SELECT realm_id, access_token, refresh_token FROM accounts "
                "WHERE account_id = 'from-sqlite'"
            )
        finally:
            await conn.close()
        assert back is not None
        assert tuple(back) == tuple(copied)[:3]
        account = await postgres.load("from-sqlite")
        assert (account.realm_id, account.access_token, account.refresh_token) == (
            REALM,
            ACCESS,
            REFRESH,
        )
    finally:
        await sqlite.close()
        await postgres.close()


async def test_no_secret_in_the_rows(pg_url: str, cipher: Cipher) -> None:
    storage = await PostgresStorage.open(pg_url, cipher)
    try:
        account = await connect(storage, "acct-plaintext-marker")
        await save_refresh(storage, account, tokens(ACCESS + "-2", REFRESH + "-2"), now=NOW)
        await storage.create_state(
            "state-marker-value",
            "acct-1",
            now=NOW,
            ttl=timedelta(minutes=10),
            code_verifier="V" * 64,
        )
    finally:
        await storage.close()
    dump = ""
    for table in ("accounts", "refresh_attempts", "oauth_states"):
        dump += "".join(str(dict(r)) for r in await fetch(pg_url, f"SELECT * FROM {table}"))  # noqa: S608
    assert "acct-plaintext-marker" in dump  # the search does find what is there
    secrets = (REALM, ACCESS, REFRESH, "4620816365172548590", "AB11760125392vXkQm3pLr8")
    for secret in (*secrets, "state-marker-value", "V" * 64):
        assert secret not in dump, secret


# -- a server that fails ------------------------------------------------------------


async def test_no_server_is_a_clear_error_without_the_password(cipher: Cipher) -> None:
    url = f"postgresql://qbo:{PASSWORD}@127.0.0.1:1/qbo"
    with pytest.raises(StorageError) as caught:
        await PostgresStorage.open(url, cipher)
    message = str(caught.value)
    assert message.startswith(
        "cannot connect to PostgreSQL at postgresql://qbo:********@127.0.0.1:1/qbo: "
    )
    assert PASSWORD not in message


async def test_a_missing_database_is_named(pg_url: str, cipher: Cipher) -> None:
    url = pg_url.rsplit("/", 1)[0] + "/qbo_no_such_database"
    with pytest.raises(StorageError, match='database "qbo_no_such_database" does not exist'):
        await PostgresStorage.open(url, cipher)


async def test_terminated_connections_are_storage_errors_then_replaced(
    pg_url: str, cipher: Cipher
) -> None:
    storage = await PostgresStorage.open(pg_url, cipher)
    try:
        account = await connect(storage)
        name = pg_url.rsplit("/", 1)[1]
        await fetch(
            pg_url.rsplit("/", 1)[0] + "/postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        outcomes: list[object] = []
        for _ in range(4):  # each broken pool connection fails once, as a StorageError
            try:
                outcomes.append(await storage.load("acct-1"))
            except StorageError as exc:
                outcomes.append(exc)
        assert all(isinstance(o, Account | StorageError) for o in outcomes), outcomes
        # The pool replaced what was cut: work goes on, and the write was not lost.
        saved = await save_refresh(storage, account, tokens("A2", "R2"), now=NOW)
        assert (await storage.load("acct-1")) == saved
    finally:
        await storage.close()
