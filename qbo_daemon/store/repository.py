"""The storage port on SQLite: accounts, OAuth states and refresh attempts in one file.

:class:`Storage` implements :class:`~qbo_daemon.store.port.AccountStore`. Beside
it: ``sqlite.py`` (the two connections, ``BEGIN IMMEDIATE`` under
``synchronous=FULL``, the group commit of typed write jobs, batched reads),
``rows.py`` (the one row mapper and column list), ``upsert.py`` (a connection or
import replacing the credentials), ``realms.py`` (which company a connection may
bring), ``states.py``, ``status_queries.py`` (the status page's reads),
``schema.py`` (migrations) and ``lock.py``.

Token writes are compare-and-swap on ``version`` through the group commit: each
returns only once its transaction is on disk, and a stale write fails alone with
:class:`StaleWriteError`. A new connection or an import replaces the credentials
on purpose, in its own transaction. Nothing here decides a time or a status.
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
from qbo_daemon.core.models import Account, iso
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.lock import DatabaseLock
from qbo_daemon.store.port import (
    AccountWrite,
    Attempt,
    ClaimedState,
    Imported,
    RealmPolicy,
    ScheduleEntry,
    StateRecord,
)
from qbo_daemon.store.realms import check_realm
from qbo_daemon.store.rows import (
    INSERT_ACCOUNT,
    INSERT_COLUMNS,
    NOTE_COLUMNS,
    SELECT_ACCOUNTS,
    SQLITE_FORMS,
    TOKEN_COLUMNS,
    account_from_row,
    account_values,
    attempt_from_row,
    attempt_values,
    changed_values,
    realm_digest,
    schedule_entries_from,
)
from qbo_daemon.store.schema import NEXT_REFRESH_KEY
from qbo_daemon.store.sqlite import Database, ReadBatcher, RowUpdate, WriteJob
from qbo_daemon.store.states import OAuthStates
from qbo_daemon.store.status_queries import StatusQueries
from qbo_daemon.store.upsert import prepare_import, upsert_account, write_import

__all__ = [
    "AccountWrite",
    "Attempt",
    "ClaimedState",
    "DatabaseLock",
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
# Rows read with their tokens and not yet written back, kept so that a write sets only
# the columns it changes (Storage.commit); the oldest are forgotten past this many.
_READ_ROWS_KEPT = 1024


class Storage:
    """Accounts, OAuth states and refresh attempts in one SQLite file."""

    def __init__(self, path: Path, database: Database, cipher: Cipher) -> None:
        self.path = path
        self._db = database
        self._cipher = cipher
        self._states = OAuthStates(database)
        self._account_reads = ReadBatcher(self._account_rows, key="account_id")
        # account_id -> (row, account) as last read with tokens: what a commit at that
        # row's version replaces (see rows.changed_values).
        self._read_rows: dict[str, tuple[sqlite3.Row, Account]] = {}
        # The status page's reads (no token column), with whichever keys are current.
        self.status_page = StatusQueries(database, lambda: self._cipher)

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
                    realm = self._cipher.decrypt(
                        row["realm_id"],
                        table="accounts",
                        column="realm_id",
                        row_key=row["account_id"],
                    )
                except CryptoError:
                    continue
                updates.append((realm_digest(self._cipher, realm), row["id"]))
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

    @property
    def primary_key_id(self) -> str:
        return self._cipher.primary_key_id

    def use_cipher(self, cipher: Cipher) -> None:
        self._cipher = cipher

    # -- reading -----------------------------------------------------------

    async def load(self, account_id: str) -> Account:
        """The account with its secrets decrypted."""
        account = await self.find(account_id)
        if account is None:
            raise AccountNotFoundError(account_id)
        return account

    async def find(self, account_id: str) -> Account | None:
        row = await self._account_reads.get(account_id)
        if row is None:
            return None
        account = account_from_row(self._cipher, row, tokens=True, forms=SQLITE_FORMS)
        kept = self._read_rows
        if account_id not in kept and len(kept) >= _READ_ROWS_KEPT:
            del kept[next(iter(kept))]
        kept[account_id] = (row, account)
        return account

    async def _account_rows(self, account_ids: list[str]) -> list[sqlite3.Row]:
        return await self._db.fetchall(
            f"{SELECT_ACCOUNTS} WHERE account_id IN ({', '.join('?' * len(account_ids))})",
            account_ids,
        )

    async def list_accounts(self) -> list[Account]:
        """Every account, ordered by ``account_id``; tokens are not decrypted (they are None)."""
        rows = await self._db.fetchall(f"{SELECT_ACCOUNTS} ORDER BY account_id")
        return [
            account_from_row(self._cipher, row, tokens=False, forms=SQLITE_FORMS) for row in rows
        ]

    async def schedule_entries(
        self, until: datetime | None = None, *, after: datetime | None = None
    ) -> list[ScheduleEntry]:
        """Every account the scheduler should time: active or expired, with times.

        With ``until``, only those due by then (and after ``after``): the
        scheduler's window, read from the index on the next refresh
        (``accounts_next_refresh``). Without, a chunk of rows at a time: with
        100,000 accounts, all the rows at once would hold ~55 MB of row objects
        beside the entries made from them.
        """
        if until is not None:
            rows = await self._db.fetchall(
                "SELECT id, account_id, status, reconnect_token_at, token_expires_at, "
                "refresh_token_expires_at, refresh_token_hard_expires_at FROM accounts "
                f"WHERE {NEXT_REFRESH_KEY} <= ? AND {NEXT_REFRESH_KEY} > ? "
                "AND refresh_token IS NOT NULL",
                (iso(until), iso(after) if after is not None else ""),
            )
            return list(schedule_entries_from(rows, forms=SQLITE_FORMS))
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
            entries.extend(schedule_entries_from(rows, forms=SQLITE_FORMS))
            if len(rows) < _SCHEDULE_CHUNK:
                return entries
            last_id = rows[-1]["id"]

    async def status_counts(self) -> dict[str, int]:
        rows = await self._db.fetchall("SELECT status, COUNT(*) AS n FROM accounts GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all (the status page's history)."""
        where, params = ("WHERE account_id = ?", (account_id,)) if account_id else ("", ())
        rows = await self._db.fetchall(
            "SELECT account_id, started_at, outcome, duration_ms, intuit_tid, error "
            f"FROM refresh_attempts {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [attempt_from_row(row, forms=SQLITE_FORMS) for row in rows]

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
            if row["key_id"] not in (cipher or self._cipher).key_ids:
                raise MissingKeyError(row["key_id"])
            if cipher is None:
                await self.load(row["sample"])

    async def ping(self) -> None:
        await self._db.fetchone("SELECT 1", ())

    # -- writing -------------------------------------------------------------

    async def commit(self, write: AccountWrite) -> Account:
        """Store ``write`` if the row is still at its ``read_version``; durable when it returns."""
        stored = replace(write.account, version=write.read_version + 1)
        columns = TOKEN_COLUMNS if write.tokens else NOTE_COLUMNS
        read = self._read_rows.pop(stored.account_id, None)
        changed = None
        if read is not None and read[1].version == write.read_version:
            # The compare-and-swap makes sure the row is still the one read.
            changed = changed_values(self._cipher, stored, columns, *read, forms=SQLITE_FORMS)
        if changed is None:
            changed = columns, account_values(self._cipher, stored, columns, forms=SQLITE_FORMS)
        update = RowUpdate(stored.account_id, write.read_version, *changed)
        attempt = (
            attempt_values(write.attempt, forms=SQLITE_FORMS) if write.attempt is not None else None
        )
        await self._db.write(WriteJob(update, attempt))
        return stored

    async def record_attempt(self, attempt: Attempt) -> None:
        """Record an attempt that changes no account (for example ``invalid_client``)."""
        await self._db.write(WriteJob(None, attempt_values(attempt, forms=SQLITE_FORMS)))

    async def upsert_connection(self, account: Account) -> Account:
        """Store a new connection, or replace the credentials of an existing account."""
        async with self._db.transaction() as conn:
            return await upsert_account(conn, self._cipher, account)

    async def import_connections(
        self, accounts: Sequence[Account], *, replace_existing: bool = True
    ) -> list[Imported]:
        """Store imported connections in one transaction: all or nothing, in order.

        Whether each account exists is read inside that transaction; an existing
        one is replaced, or with ``replace_existing=False`` left as it is. The rows
        are encrypted on a worker thread and written in one hand-off to the
        writer's thread: keep ``accounts`` to about a thousand, as token writes
        wait behind the transaction.
        """
        prepared = await asyncio.to_thread(prepare_import, self._cipher, accounts)
        return await self._db.run_transaction(
            partial(write_import, prepared=prepared, replace_existing=replace_existing)
        )

    async def insert_accounts(self, accounts: Sequence[Account]) -> int:
        """New accounts in one transaction and one statement: all or nothing.

        The bulk path (tools loading many accounts at once): no round trip per row,
        but an existing ``account_id`` fails the whole batch instead of being
        replaced. Returns how many accounts were stored.
        """
        cipher = self._cipher
        rows = [
            account_values(cipher, replace(a, version=1), INSERT_COLUMNS, forms=SQLITE_FORMS)
            for a in accounts
        ]
        async with self._db.transaction() as conn:
            await conn.executemany(INSERT_ACCOUNT, rows)
        return len(rows)

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

    async def upsert_checked_connection(
        self, account: Account, policy: RealmPolicy
    ) -> tuple[Account, str | None]:
        """A connection from the callback: stored only if ``policy`` allows its company.

        Raises :class:`RealmConflictError` (nothing written) when another account
        holds the realm or the account held another one; returns the account and
        its previous realm when the connection changed it.
        """
        assert account.realm_id is not None
        async with self._db.transaction() as conn:
            previous = await check_realm(
                conn, self._cipher, account.account_id, account.realm_id, policy
            )
            return await upsert_account(conn, self._cipher, account), previous

    async def reencrypt(self, *, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows not yet under the primary key.

        Returns (rows re-encrypted now, rows still to do). Each row is a
        compare-and-swap: a row a refresh rewrote meanwhile is simply left for
        the next call (the refresh already wrote it under the primary key).
        """
        primary = self._cipher.primary_key_id
        rows = await self._db.fetchall(
            f"{SELECT_ACCOUNTS} WHERE key_id IS NOT NULL AND key_id != ? LIMIT ?",
            (primary, batch),
        )
        done = 0
        for row in rows:
            account = account_from_row(self._cipher, row, tokens=True, forms=SQLITE_FORMS)
            try:
                await self.commit(AccountWrite(account, account.version, tokens=True))
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
            cipher=self._cipher,
            code_verifier=code_verifier,
            allow_realm_change=allow_realm_change,
        )

    async def consume_state(self, state: str, answer: str, *, now: datetime) -> ClaimedState:
        """Mark ``state`` used by ``answer`` (``store.states.answer_hash``); return its claim.

        Raises :class:`OAuthStateError` with reason ``unknown``, ``expired``,
        ``replayed`` (used before by the same answer) or ``used``; a failed
        check changes nothing.
        """
        return await self._states.consume(state, answer, now=now, cipher=self._cipher)

    async def finish_state(self, state: str, outcome: str) -> None:
        await self._states.finish(state, outcome)

    async def get_state(self, state: str) -> StateRecord | None:
        return await self._states.get(state)
