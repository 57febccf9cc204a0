"""The database schema as a list of migrations, keyed on ``PRAGMA user_version``.

Migration N brings a database from version N-1 to N. Each runs in its own
transaction together with the ``user_version`` bump (that pragma is
transactional), so a crash mid-migration leaves the previous version intact.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

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
)

SCHEMA_VERSION = len(MIGRATIONS)
