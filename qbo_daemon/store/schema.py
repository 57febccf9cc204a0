"""The database schema as a list of migrations, keyed on ``PRAGMA user_version``.

Migration N brings a database from version N-1 to N. Each runs in its own
transaction together with the ``user_version`` bump (that pragma is
transactional), so a crash mid-migration leaves the previous version intact.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from pathlib import Path

import aiosqlite

from qbo_daemon.core.errors import StorageError

# Sort keys of the status page, indexed as written here: a query uses an expression
# index only when it repeats the expression exactly. An account the scheduler does not
# time sorts after every time ("~" follows the digits); one that never failed, last.
NEXT_REFRESH_KEY = (
    "CASE WHEN status IN ('active', 'expired') AND reconnect_token_at IS NOT NULL "
    "THEN reconnect_token_at ELSE '~' END"
)
LAST_FAILURE_KEY = "COALESCE(last_failure_at, '')"

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: accounts, pending OAuth states, refresh attempts.
    (
        """
        CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            account_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            realm_id TEXT,
            access_token TEXT,
            refresh_token TEXT,
            key_id TEXT,
            token_expires_at TEXT,
            reconnect_token_at TEXT,
            refresh_token_expires_at TEXT,
            failure_count INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            last_refreshed_at TEXT,
            version INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """,
        "CREATE INDEX accounts_status ON accounts (status)",
        """
        CREATE TABLE oauth_states (
            state TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT
        )
        """,
        """
        CREATE TABLE refresh_attempts (
            id INTEGER PRIMARY KEY,
            account_id TEXT NOT NULL,
            started_at TEXT NOT NULL,
            outcome TEXT NOT NULL,
            duration_ms REAL NOT NULL,
            intuit_tid TEXT,
            error TEXT
        )
        """,
    ),
    # 2: Intuit's 5-year hard expiry of refresh tokens (introduced 2025), and the
    # outcome of a used OAuth state so a double-fired callback can show it.
    (
        "ALTER TABLE accounts ADD COLUMN refresh_token_hard_expires_at TEXT",
        "ALTER TABLE oauth_states ADD COLUMN outcome TEXT",
        "CREATE INDEX refresh_attempts_account ON refresh_attempts (account_id, id)",
    ),
    # 3: what the status page sorts and counts by (qbo_daemon/store/status_queries.py): when an
    # account last failed, and indexes for its orders and time windows.
    (
        "ALTER TABLE accounts ADD COLUMN last_failure_at TEXT",
        "UPDATE accounts SET last_failure_at = (SELECT MAX(started_at) FROM refresh_attempts "
        "WHERE refresh_attempts.account_id = accounts.account_id AND outcome != 'success') "
        "WHERE failure_count > 0",
        f"CREATE INDEX accounts_next_refresh ON accounts ({NEXT_REFRESH_KEY})",
        f"CREATE INDEX accounts_last_failure ON accounts ({LAST_FAILURE_KEY})",
        "CREATE INDEX accounts_failure_count ON accounts (failure_count)",
        "CREATE INDEX accounts_hard_expiry ON accounts (refresh_token_hard_expires_at)",
        # Counting by status, and by whether the access token has died, from the index alone.
        "CREATE INDEX accounts_status_expiry ON accounts (status, token_expires_at)",
        "DROP INDEX accounts_status",
        "CREATE INDEX refresh_attempts_started ON refresh_attempts (started_at, outcome)",
    ),
    # 4: the connect flow bound end to end. OAuth states kept only as SHA-256 hashes
    # (pending ones are carried over, hashed), with a hash of the first callback's
    # answer, the PKCE verifier (encrypted) and the realm-change permission; and per
    # account whether Intuit confirmed its realm, plus a keyed digest of the realm to
    # find the accounts of one company. Rows from before count as confirmed; the
    # digests are filled in by Storage.open, which has the keys.
    (
        """
        CREATE TABLE oauth_states_v3 (
            state_hash TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT,
            outcome TEXT,
            answer_hash TEXT,
            code_verifier TEXT,
            allow_realm_change INTEGER NOT NULL DEFAULT 0
        )
        """,
        "INSERT INTO oauth_states_v3 (state_hash, account_id, created_at, expires_at, used_at, "
        "outcome) SELECT qbo_sha256(state), account_id, created_at, expires_at, used_at, outcome "
        "FROM oauth_states",
        "DROP TABLE oauth_states",
        "ALTER TABLE oauth_states_v3 RENAME TO oauth_states",
        "CREATE INDEX oauth_states_account ON oauth_states (account_id, created_at)",
        "ALTER TABLE accounts ADD COLUMN realm_verified INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE accounts ADD COLUMN realm_digest TEXT",
        "CREATE INDEX accounts_realm_digest ON accounts (realm_digest)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
_HASHED_STATES = 4  # the migration after which no OAuth state is kept in clear


async def migrate(conn: aiosqlite.Connection, path: Path) -> None:
    """Bring the database at ``path`` to :data:`SCHEMA_VERSION`, one migration at a time."""
    cursor = await conn.execute("PRAGMA user_version")
    row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database {path} has schema version {version}, newer than this qbo-daemon "
            f"understands ({SCHEMA_VERSION}); upgrade qbo-daemon"
        )
    # Migration 4 hashes the OAuth states it carries over, and drops the clear ones:
    # zero their pages instead of only freeing them (then checkpoint, below).
    await conn.create_function("qbo_sha256", 1, sha256_hex, deterministic=True)
    scrub = version < _HASHED_STATES
    if scrub:
        await conn.execute("PRAGMA secure_delete = ON")
    for number in range(version + 1, SCHEMA_VERSION + 1):
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[number - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
            await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise StorageError(
                f"migrating database {path} to version {number} failed: {exc}"
            ) from exc
    if scrub:
        # Copy the zeroed pages into the main file and empty the WAL, so no clear
        # state is left in either.
        await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await conn.execute("PRAGMA secure_delete = OFF")
    # The database holds encrypted secrets and realm ids: keep it private.
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)


def sha256_hex(text: str) -> str:
    """How an OAuth state is kept (store.states), and how migration 4 hashes the old ones."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
