"""SQLite storage: accounts, OAuth states and refresh attempts in one file.

:class:`Storage` is what the rest of the daemon calls. Beside it: ``database.py``
(the two connections, ``BEGIN IMMEDIATE`` under ``synchronous=FULL``, the group
commit, batched reads), ``rows.py`` (rows as values, secrets encrypted bound to
their place), ``account_upsert.py`` (a connection or import replacing the
credentials), ``oauth_states.py``, ``schema.py`` (migrations) and ``dblock.py``.

Token writes are compare-and-swap on ``version`` through the group commit: each
returns only once its transaction is on disk, and a stale write fails alone with
:class:`StaleWriteError`. A new connection or an import replaces the credentials
on purpose, in its own transaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from qbo_daemon.core.errors import (
    AccountNotFoundError,
    CryptoError,
    MissingKeyError,
    StaleWriteError,
)
from qbo_daemon.core.models import Account, AccountStatus, TokenSet, iso, reconnect_at
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.lock import DatabaseLock
from qbo_daemon.store.realms import RealmPolicy, check_realm
from qbo_daemon.store.rows import (
    ACCOUNT_COLUMNS,
    Attempt,
    ScheduleEntry,
    account_from_row,
    attempt_from_row,
    attempt_statements,
    encrypt_secrets,
    realm_digest,
    schedule_entries_from,
)
from qbo_daemon.store.sqlite import Database, ReadBatcher
from qbo_daemon.store.states import ClaimedState, OAuthStates, StateRecord
from qbo_daemon.store.status_queries import StatusQueries
from qbo_daemon.store.upsert import (
    NEW_ACCOUNT_INSERT,
    Imported,
    ImportItem,
    new_account_rows,
    prepare_import,
    upsert_account,
    write_import,
)

__all__ = [
    "Attempt",
    "ClaimedState",
    "DatabaseLock",
    "ImportItem",
    "Imported",
    "RealmPolicy",
    "ScheduleEntry",
    "StateRecord",
    "Storage",
]

# Rows per query when the scheduler loads every account at start-up.
_SCHEDULE_CHUNK = 5000
# Account ids per "IN (...)" query.
_ID_CHUNK = 500


class Storage:
    """Accounts, OAuth states and refresh attempts in one SQLite file."""

    def __init__(self, path: Path, database: Database, cipher: Cipher) -> None:
        self.path = path
        self._db = database
        self.cipher = cipher
        self._states = OAuthStates(database)
        self._account_reads = ReadBatcher(self._account_rows, key="account_id")
        # The status page's reads (no token column), with whichever keys are current.
        self.status_page = StatusQueries(database, lambda: self.cipher)

    @classmethod
    async def open(cls, path: Path, cipher: Cipher, *, attempts_keep: int = 100_000) -> Storage:
        """Open (creating or migrating) the database at ``path``."""
        storage = cls(path, await Database.open(path, attempts_keep=attempts_keep), cipher)
        try:
            await storage._fill_realm_digests()
        except BaseException:
            await storage.close()
            raise
        return storage

    async def _fill_realm_digests(self, batch: int = 500) -> None:
        """Give rows stored before schema version 4 the digest that finds them by realm.

        A row whose realm does not decrypt is left alone: ``verify_keys`` names the
        missing key.
        """
        last_id = 0
        while True:
            rows = await self._db.fetchall(
                "SELECT id, account_id, realm_id FROM accounts WHERE realm_digest IS NULL "
                "AND realm_id IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
                (last_id, batch),
            )
            if not rows:
                return
            last_id = rows[-1]["id"]
            updates = []
            for row in rows:
                try:
                    realm = self.cipher.decrypt(
                        row["realm_id"],
                        table="accounts",
                        column="realm_id",
                        row_key=row["account_id"],
                    )
                except CryptoError:
                    continue
                updates.append((realm_digest(self.cipher, realm), row["id"]))
            async with self._db.transaction() as conn:
                await conn.executemany(
                    "UPDATE accounts SET realm_digest = ? WHERE id = ? AND realm_digest IS NULL",
                    updates,
                )

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        await self._db.close()

    @property
    def writer(self) -> asyncio.Task[None] | None:
        """The database's group-commit writer task, for the daemon's supervisor."""
        return self._db.writer

    # -- reading -----------------------------------------------------------

    async def get_account(self, account_id: str) -> Account:
        """The account with its secrets decrypted."""
        row = await self._account_reads.get(account_id)
        if row is None:
            raise AccountNotFoundError(account_id)
        return account_from_row(self.cipher, row, tokens=True)

    async def _account_rows(self, account_ids: list[str]) -> list[sqlite3.Row]:
        return await self._db.fetchall(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
            f"WHERE account_id IN ({', '.join('?' * len(account_ids))})",
            account_ids,
        )

    async def find_account(self, account_id: str) -> Account | None:
        try:
            return await self.get_account(account_id)
        except AccountNotFoundError:
            return None

    async def list_accounts(self) -> list[Account]:
        """Every account, ordered by ``account_id``; tokens are not decrypted (they are None)."""
        rows = await self._db.fetchall(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY account_id"
        )
        return [account_from_row(self.cipher, row, tokens=False) for row in rows]

    async def schedule_entries(self) -> list[ScheduleEntry]:
        """Every account the scheduler should time: active or expired, with times.

        Read a chunk of rows at a time: with 100,000 accounts, all the rows at once
        would hold ~55 MB of row objects beside the entries made from them.
        """
        entries = []
        last_id = 0
        while True:
            # "+status": walk the primary key from last_id; the status index would make
            # every chunk scan and sort all the rows after it.
            rows = await self._db.fetchall(
                "SELECT id, account_id, status, reconnect_token_at, token_expires_at, "
                "refresh_token_expires_at, refresh_token_hard_expires_at FROM accounts "
                "WHERE +status IN ('active', 'expired') AND refresh_token IS NOT NULL "
                "AND id > ? ORDER BY id LIMIT ?",
                (last_id, _SCHEDULE_CHUNK),
            )
            entries.extend(schedule_entries_from(rows))
            if len(rows) < _SCHEDULE_CHUNK:
                return entries
            last_id = rows[-1]["id"]

    async def status_counts(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT status, COUNT(*) AS n FROM accounts GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all."""
        where, params = ("WHERE account_id = ?", (account_id,)) if account_id else ("", ())
        rows = await self._db.fetchall(
            "SELECT account_id, started_at, outcome, duration_ms, intuit_tid, error "
            f"FROM refresh_attempts {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [attempt_from_row(row) for row in rows]

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Fail fast when a stored secret cannot be decrypted with the configured keys.

        Checks every key id in use is configured, and decrypts one row per key id.
        With ``cipher`` (a reload's new keys, not yet in use) only the key ids are
        checked: an id is derived from its key, so a known id is the same key.
        """
        rows = await self._db.fetchall(
            "SELECT key_id, MIN(account_id) AS sample FROM accounts "
            "WHERE key_id IS NOT NULL GROUP BY key_id"
        )
        for row in rows:
            if row["key_id"] not in (cipher or self.cipher).key_ids:
                raise MissingKeyError(row["key_id"])
            if cipher is None:
                await self.get_account(row["sample"])

    async def ping(self) -> None:
        await self._db.fetchone("SELECT 1", ())

    # -- token writes --------------------------------------------------------

    async def save_connection(
        self, account_id: str, realm_id: str, tokens: TokenSet, *, lead: timedelta, now: datetime
    ) -> Account:
        """Store a new connection, or replace the tokens of an existing account (reconnect)."""
        async with self._db.transaction() as conn:
            return await upsert_account(
                conn, self.cipher, account_id, realm_id, tokens, lead=lead, now=now
            )

    async def save_checked_connection(
        self,
        account_id: str,
        realm_id: str,
        tokens: TokenSet,
        *,
        lead: timedelta,
        now: datetime,
        policy: RealmPolicy,
        realm_verified: bool,
    ) -> tuple[Account, str | None]:
        """A connection from the callback: stored only if ``policy`` allows its company.

        Raises :class:`RealmConflictError` (nothing written) when another account
        holds the realm or the account held another one; returns the account and
        its previous realm when the connection changed it.
        """
        async with self._db.transaction() as conn:
            previous = await check_realm(conn, self.cipher, account_id, realm_id, policy)
            account = await upsert_account(
                conn,
                self.cipher,
                account_id,
                realm_id,
                tokens,
                lead=lead,
                now=now,
                realm_verified=realm_verified,
            )
            return account, previous

    async def mark_realm_verified(self, account: Account, *, now: datetime) -> Account:
        """Note that Intuit confirmed the account's realm, if the row is still at its version."""
        updated = replace(account, realm_verified=True, version=account.version + 1, updated_at=now)
        await self._db.write(
            [
                (
                    "UPDATE accounts SET realm_verified = 1, version = version + 1, "
                    "updated_at = ? WHERE account_id = ? AND version = ?",
                    (iso(now), account.account_id, account.version),
                )
            ],
            cas=(account.account_id, account.version),
        )
        return updated

    async def import_accounts(
        self,
        items: Sequence[ImportItem],
        *,
        lead: timedelta,
        now: datetime,
        replace_existing: bool = True,
    ) -> list[Imported]:
        """Store every item in one transaction: all or nothing.

        Whether each account exists is read inside that transaction; an existing
        one is replaced, or with ``replace_existing=False`` left as it is (reported, not
        stored). An access token without a known future expiry is treated as dead,
        so the account is due for a refresh at once. The rows are encrypted on a
        worker thread and written in one hand-off to the writer's thread: keep
        ``items`` to about a thousand, as token writes wait behind the transaction.
        """
        prepared = await asyncio.to_thread(prepare_import, self.cipher, items, lead=lead, now=now)
        return await self._db.run_transaction(
            partial(write_import, prepared=prepared, replace_existing=replace_existing)
        )

    async def existing_account_ids(self, account_ids: Sequence[str]) -> set[str]:
        """Which of ``account_ids`` are stored (a snapshot: for reports, not for writes)."""
        found: set[str] = set()
        for start in range(0, len(account_ids), _ID_CHUNK):
            chunk = account_ids[start : start + _ID_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = await self._db.fetchall(
                f"SELECT account_id FROM accounts WHERE account_id IN ({marks})", chunk
            )
            found.update(row["account_id"] for row in rows)
        return found

    async def insert_accounts(
        self, items: Sequence[ImportItem], *, lead: timedelta, now: datetime
    ) -> int:
        """Store new accounts in one transaction and one statement: all or nothing.

        The bulk path (the benchmark loads 100,000 accounts through it): the same
        rows as :meth:`import_accounts`, without its round trip per row, but an
        existing ``account_id`` fails the whole batch instead of being replaced.
        Returns how many accounts were stored.
        """
        rows = new_account_rows(self.cipher, items, lead=lead, now=now)
        async with self._db.transaction() as conn:
            await conn.executemany(NEW_ACCOUNT_INSERT, rows)
        return len(rows)

    async def save_refresh(
        self,
        account: Account,
        tokens: TokenSet,
        *,
        lead: timedelta,
        now: datetime,
        attempt: Attempt | None = None,
    ) -> Account:
        """Persist a refresh's tokens and times if the row is still at ``account.version``.

        Durable when this returns; raises :class:`StaleWriteError` when the row
        changed meanwhile.
        """
        key_id = self.cipher.primary_key_id
        due = reconnect_at(tokens.token_expires_at, lead, tokens.obtained_at)
        hard = tokens.refresh_token_hard_expires_at or account.refresh_token_hard_expires_at
        updated = replace(
            account,
            status=AccountStatus.ACTIVE,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_expires_at=tokens.token_expires_at,
            reconnect_token_at=due,
            refresh_token_expires_at=tokens.refresh_token_expires_at,
            refresh_token_hard_expires_at=hard,
            failure_count=0,
            last_error=None,
            last_refreshed_at=now,
            version=account.version + 1,
            updated_at=now,
        )
        enc = encrypt_secrets(self.cipher, updated)
        statements = [
            (
                "UPDATE accounts SET status = ?, realm_id = ?, realm_digest = ?, "
                "access_token = ?, refresh_token = ?, key_id = ?, token_expires_at = ?, "
                "reconnect_token_at = ?, refresh_token_expires_at = ?, "
                "refresh_token_hard_expires_at = ?, failure_count = 0, last_error = NULL, "
                "last_refreshed_at = ?, version = version + 1, updated_at = ? "
                "WHERE account_id = ? AND version = ?",
                (
                    updated.status.value,
                    enc["realm_id"],
                    enc["realm_digest"],
                    enc["access_token"],
                    enc["refresh_token"],
                    key_id,
                    iso(updated.token_expires_at),
                    iso(due),
                    iso(updated.refresh_token_expires_at),
                    iso(hard),
                    iso(now),
                    iso(now),
                    account.account_id,
                    account.version,
                ),
            )
        ]
        statements.extend(attempt_statements(attempt))
        await self._db.write(statements, cas=(account.account_id, account.version))
        return updated

    async def record_failure(
        self,
        account: Account,
        *,
        status: AccountStatus,
        error: str,
        now: datetime,
        attempt: Attempt | None = None,
    ) -> Account:
        """Note a failed refresh (and the status it leaves) if the row is still at its version."""
        updated = replace(
            account,
            status=status,
            failure_count=account.failure_count + 1,
            last_error=error,
            version=account.version + 1,
            updated_at=now,
        )
        statements = [
            (
                "UPDATE accounts SET status = ?, failure_count = failure_count + 1, "
                "last_error = ?, last_failure_at = ?, version = version + 1, updated_at = ? "
                "WHERE account_id = ? AND version = ?",
                (status.value, error, iso(now), iso(now), account.account_id, account.version),
            )
        ]
        statements.extend(attempt_statements(attempt))
        await self._db.write(statements, cas=(account.account_id, account.version))
        return updated

    async def record_attempt(self, attempt: Attempt) -> None:
        """Record an attempt that changes no account (for example ``invalid_client``)."""
        await self._db.write(attempt_statements(attempt), cas=None)

    async def forget_tokens(self, account: Account, *, now: datetime) -> Account:
        """Disconnect: drop every token, keep a tombstone row marked ``disconnected``.

        The tokens' times go too: an expiry of a token that no longer exists only
        makes a dead connection look alive in a listing.
        """
        updated = replace(
            account,
            status=AccountStatus.DISCONNECTED,
            access_token=None,
            refresh_token=None,
            token_expires_at=None,
            reconnect_token_at=None,
            refresh_token_expires_at=None,
            refresh_token_hard_expires_at=None,
            version=account.version + 1,
            updated_at=now,
        )
        await self._db.write(
            [
                (
                    "UPDATE accounts SET status = 'disconnected', access_token = NULL, "
                    "refresh_token = NULL, token_expires_at = NULL, reconnect_token_at = NULL, "
                    "refresh_token_expires_at = NULL, refresh_token_hard_expires_at = NULL, "
                    "version = version + 1, updated_at = ? WHERE account_id = ? AND version = ?",
                    (iso(now), account.account_id, account.version),
                )
            ],
            cas=(account.account_id, account.version),
        )
        return updated

    async def reencrypt(self, *, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows not yet under the primary key.

        Returns (rows re-encrypted now, rows still to do). Each row is a
        compare-and-swap: a row a refresh rewrote meanwhile is simply left for
        the next call (the refresh already wrote it under the primary key).
        """
        primary = self.cipher.primary_key_id
        rows = await self._db.fetchall(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE key_id IS NOT NULL AND key_id != ? "
            "LIMIT ?",
            (primary, batch),
        )
        done = 0
        for row in rows:
            account = account_from_row(self.cipher, row, tokens=True)
            enc = encrypt_secrets(self.cipher, account)
            try:
                await self._db.write(
                    [
                        (
                            "UPDATE accounts SET realm_id = ?, realm_digest = ?, "
                            "access_token = ?, refresh_token = ?, key_id = ?, "
                            "version = version + 1 WHERE account_id = ? AND version = ?",
                            (
                                enc["realm_id"],
                                enc["realm_digest"],
                                enc["access_token"],
                                enc["refresh_token"],
                                primary,
                                account.account_id,
                                account.version,
                            ),
                        )
                    ],
                    cas=(account.account_id, account.version),
                )
                done += 1
            except StaleWriteError:
                continue
        remaining = await self._db.fetchone(
            "SELECT COUNT(*) AS n FROM accounts WHERE key_id IS NOT NULL AND key_id != ?",
            (primary,),
        )
        return done, int(remaining["n"]) if remaining else 0

    # -- OAuth states --------------------------------------------------------

    async def create_state(
        self,
        state: str,
        account_id: str,
        *,
        now: datetime,
        ttl: timedelta,
        code_verifier: str | None = None,
        allow_realm_change: bool = False,
    ) -> int:
        """Store a state (as its hash); returns how many older pending ones were dropped."""
        return await self._states.create(
            state,
            account_id,
            now=now,
            ttl=ttl,
            cipher=self.cipher,
            code_verifier=code_verifier,
            allow_realm_change=allow_realm_change,
        )

    async def consume_state(self, state: str, answer: str, *, now: datetime) -> ClaimedState:
        """Mark ``state`` used by ``answer`` (``store.states.answer_hash``); return its claim.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired``,
        ``replayed`` (used before by the same answer) or ``used``; a failed
        check changes nothing.
        """
        return await self._states.consume(state, answer, now=now, cipher=self.cipher)

    async def finish_state(self, state: str, outcome: str) -> None:
        await self._states.finish(state, outcome)

    async def get_state(self, state: str) -> StateRecord | None:
        return await self._states.get(state)
