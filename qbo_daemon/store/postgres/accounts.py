"""The ``accounts`` and ``refresh_attempts`` tables on PostgreSQL, as the storage port needs them.

The operations take and give whole :class:`Account` values and decide
nothing about times or statuses: a write stores the row its caller decided.

- :meth:`AccountTable.commit` is the compare-and-swap on ``version``: one
  statement that updates the row only if it is still at the version the
  caller read, appends the attempt only if it did, and notifies
  ``qbo_account`` (delivered at commit). A stale write changes nothing and
  raises :class:`StaleWriteError`.
- :meth:`AccountTable.upsert` stores a connection or import whatever the row
  held (``INSERT … ON CONFLICT``), keeping the row's ``id`` and ``created_at``.

The attempts table is trimmed to its newest ``attempts_keep`` rows every
:data:`TRIM_EVERY` attempts this process writes (so with several daemons it
holds at most ``attempts_keep`` + :data:`TRIM_EVERY` per daemon). The trim is
a transaction of its own, after the write that made it due: it takes a lock
that waits for attempts being written, so it sees them all, and it must not
wait while holding an account's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

import structlog

from qbo_daemon.core.errors import (
    AccountNotFoundError,
    CryptoError,
    MissingKeyError,
    StaleWriteError,
    StorageError,
)
from qbo_daemon.core.models import Account
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import Attempt, Claim, Imported, RealmPolicy, ScheduleEntry
from qbo_daemon.store.postgres.database import Conn, PgDatabase
from qbo_daemon.store.postgres.realms import check_realm
from qbo_daemon.store.postgres.rows import (
    CHANGE_PAYLOAD,
    CONNECTION_COLUMNS,
    NOTE_COLUMNS,
    POSTGRES_FORMS,
    SCHEDULE_COLUMNS,
    TOKEN_COLUMNS,
)
from qbo_daemon.store.rows import (
    ATTEMPT_COLUMNS,
    INSERT_COLUMNS,
    SELECT_ACCOUNTS,
    account_from_row,
    account_values,
    attempt_from_row,
    attempt_values,
    realm_digest,
    schedule_entries_from,
)

log = structlog.get_logger("qbo_daemon.store.postgres")

# The channel every account change is announced on; the payload is the account_id.
CHANNEL = "qbo_account"
# Attempts written (by this process) between two trims of the attempts table.
TRIM_EVERY = 1000
# Rows per query when the scheduler reads every account it times.
SCHEDULE_CHUNK = 5000
_MAX_ID = 2**63 - 1  # bigint's largest: a keyset step past every id
_ATTEMPT_TYPES = ("text", "timestamptz", "text", "float8", "text", "text")


def _commit_statement(columns: tuple[str, ...], *, tokens: bool) -> str:
    """The compare-and-swap of ``columns`` ($3…), the attempt after them, the notification.

    $1 is the account_id, $2 the version read; the attempt's values follow the
    columns' and are all NULL when there is no attempt; then the claim's owner
    and generation (NULL without a claim), whether to keep the row's mark of an
    abandoned call, and the writing node (the notification's origin).

    The write lands whenever the row is at the version read: a node that lost
    its claim but finds the row exactly as it read it holds the newest token
    there is. The claim ends only if it is still this one (``fenced``, which the
    statement returns), so a later node's claim is never cut short. New tokens
    from a refresh end the mark of an abandoned call: the chain is whole again.
    """
    params = {column: f"${n}" for n, column in enumerate(columns, 3)}
    sets = ", ".join(f"{column} = {param}" for column, param in params.items())
    first = len(columns) + 3
    attempt = ", ".join(f"${n}::{kind}" for n, kind in enumerate(_ATTEMPT_TYPES, first))
    owner, generation, keep, origin = (f"${n}" for n in range(first + 6, first + 10))
    fenced = (
        f"({owner}::text IS NOT NULL AND p.prior_owner IS NOT DISTINCT FROM {owner}::text "
        f"AND p.prior_generation = {generation}::bigint)"
    )
    # (The IS NULL test only gives the parameter a type where nothing else uses it.)
    # New tokens under a claim end it (a refresh); a key rotation's rewrite does not.
    cleared = f"{owner}::text IS NOT NULL" if tokens else f"({fenced} AND NOT {keep}::boolean)"
    inflight = f"CASE WHEN {cleared} OR {keep}::boolean IS NULL THEN NULL ELSE a.inflight_since END"
    payload = CHANGE_PAYLOAD.replace("$origin", origin)
    return (
        "WITH prior AS (SELECT account_id, lease_owner AS prior_owner, "
        "lease_generation AS prior_generation FROM accounts "
        "WHERE account_id = $1 AND version = $2 FOR UPDATE), "
        f"updated AS (UPDATE accounts a SET {sets}, version = a.version + 1, "
        f"lease_owner = CASE WHEN {fenced} THEN NULL ELSE a.lease_owner END, "
        f"lease_until = CASE WHEN {fenced} THEN NULL ELSE a.lease_until END, "
        f"inflight_since = {inflight} "
        "FROM prior p WHERE a.account_id = p.account_id "
        "RETURNING a.account_id, a.version, a.status, a.reconnect_token_at, a.failure_count, "
        f"a.last_failure_at, {fenced} AS fenced), "
        f"attempt AS (INSERT INTO refresh_attempts ({', '.join(ATTEMPT_COLUMNS)}) "
        f"SELECT {attempt} FROM updated WHERE ${first + 1}::timestamptz IS NOT NULL) "
        f"SELECT fenced, pg_notify('{CHANNEL}', {payload}) FROM updated"
    )


COMMIT_TOKENS = _commit_statement(TOKEN_COLUMNS, tokens=True)
COMMIT_NOTE = _commit_statement(NOTE_COLUMNS, tokens=False)
# A new connection or import replaces the credentials: any claim on the old ones ends
# (that call's answer can no longer be stored), and so does the mark of an abandoned call.
_ORIGIN = len(INSERT_COLUMNS) + 1
UPSERT = (
    f"WITH stored AS (INSERT INTO accounts AS a ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${n}' for n in range(1, len(INSERT_COLUMNS) + 1))}) "
    "ON CONFLICT (account_id) DO UPDATE SET "
    + ", ".join(f"{column} = EXCLUDED.{column}" for column in CONNECTION_COLUMNS)
    + ", version = a.version + 1, lease_owner = NULL, lease_until = NULL, inflight_since = NULL "
    "RETURNING id, account_id, version, created_at, last_failure_at, status, "
    "reconnect_token_at, failure_count, (xmax <> 0) AS existed) "
    f"SELECT id, version, created_at, last_failure_at, existed, "
    f"pg_notify('{CHANNEL}', {CHANGE_PAYLOAD.replace('$origin', f'${_ORIGIN}')}) FROM stored"
)
INSERT_ATTEMPT = (
    f"INSERT INTO refresh_attempts ({', '.join(ATTEMPT_COLUMNS)}) VALUES ($1, $2, $3, $4, $5, $6)"
)
TRIM_ATTEMPTS = (
    "DELETE FROM refresh_attempts WHERE id <= (SELECT max(id) FROM refresh_attempts) - $1"
)
# Waits for the attempts being written and holds off new ones, so the trim sees them all.
_LOCK_ATTEMPTS = "LOCK TABLE refresh_attempts IN SHARE ROW EXCLUSIVE MODE"


class AccountTable:
    """Accounts and their refresh attempts; secrets under ``cipher`` (a reload may swap it)."""

    def __init__(
        self, database: PgDatabase, cipher: Cipher, *, attempts_keep: int, node_id: str
    ) -> None:
        self._db = database
        self.cipher = cipher
        self.node_id = node_id  # named as the origin of every change this node notifies
        self._attempts_keep = attempts_keep
        # Start due for a trim: the count is not kept across restarts (as on SQLite).
        self._attempts_since_trim = TRIM_EVERY - 1

    # -- reading -------------------------------------------------------------------

    async def find(self, account_id: str) -> Account | None:
        """The account with its secrets decrypted, or None."""
        record = await self._db.fetchrow(f"{SELECT_ACCOUNTS} WHERE account_id = $1", account_id)
        return (
            None
            if record is None
            else account_from_row(self.cipher, record, tokens=True, forms=POSTGRES_FORMS)
        )

    async def load(self, account_id: str) -> Account:
        """The account with its secrets decrypted; :class:`AccountNotFoundError` if none."""
        account = await self.find(account_id)
        if account is None:
            raise AccountNotFoundError(account_id)
        return account

    async def list_accounts(self) -> list[Account]:
        """Every account by ``account_id``; the tokens are not decrypted (they are None)."""
        records = await self._db.fetch(f"{SELECT_ACCOUNTS} ORDER BY account_id")
        return [
            account_from_row(self.cipher, r, tokens=False, forms=POSTGRES_FORMS) for r in records
        ]

    async def schedule_entries(
        self, until: datetime | None = None, *, after: datetime | None = None
    ) -> list[ScheduleEntry]:
        """Every active or expired account holding a refresh token and a token expiry.

        With ``until``, only those due by then (and after ``after``, if given):
        read from the partial index on ``reconnect_token_at`` (``accounts_due``),
        so a node's start-up and each refill of its window read the window, not
        the table.
        """
        if until is not None:
            return await self._window(until, after)
        entries: list[ScheduleEntry] = []
        last_id = 0
        while True:
            records = await self._db.fetch(
                f"SELECT {SCHEDULE_COLUMNS} FROM accounts "
                "WHERE status IN ('active', 'expired') AND refresh_token IS NOT NULL "
                "AND id > $1 ORDER BY id LIMIT $2",
                last_id,
                SCHEDULE_CHUNK,
            )
            entries.extend(schedule_entries_from(records, forms=POSTGRES_FORMS))
            if len(records) < SCHEDULE_CHUNK:
                return entries
            last_id = records[-1]["id"]

    async def _window(self, until: datetime, after: datetime | None) -> list[ScheduleEntry]:
        """The accounts due in (``after``, ``until``], a chunk at a time in due order.

        asyncpg decodes a result on the event loop: a million accounts' window in
        one query held the loop (and every timer) for a second or more.
        """
        entries: list[ScheduleEntry] = []
        # Strictly after ``after``: past every id at that instant.
        last_due, last_id = after, (_MAX_ID if after is not None else 0)
        while True:
            records = await self._db.fetch(
                f"SELECT {SCHEDULE_COLUMNS} FROM accounts "
                "WHERE status IN ('active', 'expired') AND reconnect_token_at <= $1 "
                "AND reconnect_token_at >= coalesce($2, '-infinity'::timestamptz) "
                "AND (reconnect_token_at, id) > (coalesce($2, '-infinity'::timestamptz), $3) "
                "AND refresh_token IS NOT NULL ORDER BY reconnect_token_at, id LIMIT $4",
                until,
                last_due,
                last_id,
                SCHEDULE_CHUNK,
            )
            entries.extend(schedule_entries_from(records, forms=POSTGRES_FORMS))
            if len(records) < SCHEDULE_CHUNK:
                return entries
            last_due, last_id = records[-1]["reconnect_token_at"], records[-1]["id"]

    async def status_counts(self) -> dict[str, int]:
        records = await self._db.fetch("SELECT status, count(*) AS n FROM accounts GROUP BY status")
        return {r["status"]: r["n"] for r in records}

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all.

        Newest by ``started_at``: daemons writing at once insert in no set order.
        """
        where = "WHERE account_id = $2" if account_id else "WHERE $2::text IS NULL"
        records = await self._db.fetch(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM refresh_attempts {where} "
            "ORDER BY started_at DESC, id DESC LIMIT $1",
            limit,
            account_id,
        )
        return [attempt_from_row(r, forms=POSTGRES_FORMS) for r in records]

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Raise :class:`MissingKeyError` if a stored value's key is not configured.

        Decrypts one row per key id in use; with ``cipher`` (a reload's keys, not
        yet in use) only checks the key ids, as SQLite's storage does.
        """
        records = await self._db.fetch(
            "SELECT key_id, min(account_id) AS sample FROM accounts "
            "WHERE key_id IS NOT NULL GROUP BY key_id"
        )
        for record in records:
            if record["key_id"] not in (cipher or self.cipher).key_ids:
                raise MissingKeyError(record["key_id"])
            if cipher is None:
                await self.load(record["sample"])

    # -- writing -------------------------------------------------------------------

    async def commit(
        self,
        account: Account,
        read_version: int,
        *,
        tokens: bool,
        attempt: Attempt | None,
        claim: Claim | None = None,
        keep_abandoned: bool = False,
    ) -> Account:
        """Store ``account`` if the row is still at ``read_version``; then at ``read_version + 1``.

        With ``tokens`` false, the secret columns keep what is stored (a note).
        Durable when it returns; :class:`StaleWriteError` (nothing written, the
        attempt neither) when the row changed or is gone.
        """
        columns, statement = (
            (TOKEN_COLUMNS, COMMIT_TOKENS) if tokens else (NOTE_COLUMNS, COMMIT_NOTE)
        )
        values = account_values(self.cipher, account, columns, forms=POSTGRES_FORMS)
        noted = (
            attempt_values(attempt, forms=POSTGRES_FORMS)
            if attempt is not None
            else (None,) * len(ATTEMPT_COLUMNS)
        )

        fence = (None, None) if claim is None else (claim.owner, claim.generation)

        # One statement: the compare-and-swap, the attempt and the notice commit together.
        done = await self._db.write_one(
            statement,
            account.account_id,
            read_version,
            *values,
            *noted,
            *fence,
            keep_abandoned,
            self.node_id,
        )
        if done is None:
            raise StaleWriteError(account.account_id, read_version)
        if claim is not None and not done["fenced"]:
            # Paused or cut off past its lease, but nothing was written meanwhile: the
            # answer it holds is the newest there is, and storing it is what saves it.
            log.warning(
                "claim.lost",
                account_id=account.account_id,
                generation=claim.generation,
                detail="the claim ran out before the answer was stored; the row was "
                "unchanged, so the answer was stored",
            )
        if attempt is not None:
            await self._count_attempt()
        return replace(account, version=read_version + 1)

    async def record_attempt(self, attempt: Attempt) -> None:
        """Note an attempt that changes no account (``invalid_client``)."""
        await self._db.write(
            lambda conn: conn.execute(
                INSERT_ATTEMPT, *attempt_values(attempt, forms=POSTGRES_FORMS)
            )
        )
        await self._count_attempt()

    async def upsert(self, accounts: Sequence[Account]) -> list[Account]:
        """Make each account's credentials the stored ones, in one transaction: all or nothing.

        Not a compare-and-swap: a connection or import wins over whatever the row
        held. A new row is at version 1; an existing one keeps its ``id`` and
        ``created_at`` and its version moves on.
        """
        cipher, origin = self.cipher, self.node_id
        return await self._db.write(lambda conn: _upsert_on(conn, cipher, accounts, origin))

    async def import_(
        self, accounts: Sequence[Account], *, replace_existing: bool
    ) -> list[Imported]:
        """:meth:`upsert`, saying of each whether it existed; an existing one is left
        as it is unless ``replace_existing``. One transaction: all or nothing."""
        cipher, origin = self.cipher, self.node_id
        return await self._db.write(
            lambda conn: _import_on(conn, cipher, accounts, replace_existing, origin)
        )

    async def existing_ids(self, account_ids: Sequence[str]) -> set[str]:
        """Which of ``account_ids`` are stored (a snapshot)."""
        records = await self._db.fetch(
            "SELECT account_id FROM accounts WHERE account_id = ANY($1::text[])",
            list(account_ids),
        )
        return {r["account_id"] for r in records}

    async def upsert_checked(
        self, account: Account, policy: RealmPolicy
    ) -> tuple[Account, str | None]:
        """:meth:`upsert` one connection if the realm rules allow it, in one transaction.

        Raises :class:`RealmConflictError` (nothing written); returns the stored
        account and its previous realm when the connection changed it.
        """
        cipher, origin = self.cipher, self.node_id
        realm_id = account.realm_id
        assert realm_id is not None  # a connection always names its company

        async def work(conn: Conn) -> tuple[Account, str | None]:
            previous = await check_realm(conn, cipher, account.account_id, realm_id, policy)
            (stored,) = await _upsert_on(conn, cipher, [account], origin)
            return stored, previous

        return await self._db.write(work)

    async def fill_realm_digests(self, batch: int = 500) -> None:
        """Give rows stored before schema version 2 the digest that finds them by realm.

        A row whose realm does not decrypt is left alone: ``verify_keys`` names
        the missing key. Several daemons may run this at once: each row is
        written only while its digest is still missing.
        """
        last_id = 0
        while True:
            records = await self._db.fetch(
                "SELECT id, account_id, realm_id FROM accounts WHERE realm_digest IS NULL "
                "AND realm_id IS NOT NULL AND id > $1 ORDER BY id LIMIT $2",
                last_id,
                batch,
            )
            if not records:
                return
            last_id = records[-1]["id"]
            updates = []
            for record in records:
                try:
                    realm = self.cipher.decrypt(
                        record["realm_id"],
                        table="accounts",
                        column="realm_id",
                        row_key=record["account_id"],
                    )
                except CryptoError:
                    continue
                updates.append((realm_digest(self.cipher, realm), record["id"]))

            async def work(conn: Conn, updates: list[tuple[str | None, int]] = updates) -> None:
                await conn.executemany(
                    "UPDATE accounts SET realm_digest = $1 WHERE id = $2 AND realm_digest IS NULL",
                    updates,
                )

            await self._db.write(work)

    async def insert_new(self, accounts: Sequence[Account]) -> int:
        """Store new accounts with one ``COPY``: all or nothing, an existing one fails it all.

        The bulk path (the benchmark): no notification per row.
        """
        cipher = self.cipher
        records = [
            account_values(cipher, replace(a, version=1), INSERT_COLUMNS, forms=POSTGRES_FORMS)
            for a in accounts
        ]

        async def work(conn: Conn) -> None:
            await conn.copy_records_to_table("accounts", records=records, columns=INSERT_COLUMNS)

        await self._db.write(work)
        return len(records)

    async def reencrypt(self, *, batch: int) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows not under the primary key: (done now, still to do).

        Each row is a compare-and-swap: one a refresh rewrote meanwhile is left
        for the next call (the refresh wrote it under the primary key).
        """
        primary = self.cipher.primary_key_id
        records = await self._db.fetch(
            f"{SELECT_ACCOUNTS} WHERE key_id IS NOT NULL AND key_id <> $1 LIMIT $2",
            primary,
            batch,
        )
        done = 0
        for record in records:
            account = account_from_row(self.cipher, record, tokens=True, forms=POSTGRES_FORMS)
            try:
                await self.commit(account, account.version, tokens=True, attempt=None)
                done += 1
            except StaleWriteError:
                continue
        remaining = await self._db.fetchrow(
            "SELECT count(*) AS n FROM accounts WHERE key_id IS NOT NULL AND key_id <> $1",
            primary,
        )
        return done, int(remaining["n"]) if remaining else 0

    # -- the attempts table's bound ------------------------------------------------------

    async def _count_attempt(self) -> None:
        """Count an attempt written; every :data:`TRIM_EVERY`, trim the table.

        The attempt is already committed: a failed trim is logged, never raised
        (the caller would take its durable write for a failed one).
        """
        self._attempts_since_trim += 1
        if self._attempts_since_trim < TRIM_EVERY:
            return
        self._attempts_since_trim = 0

        async def trim(conn: Conn) -> None:
            await conn.execute(_LOCK_ATTEMPTS)
            await conn.execute(TRIM_ATTEMPTS, self._attempts_keep)

        try:
            await self._db.write(trim)
        except StorageError as exc:
            self._attempts_since_trim = TRIM_EVERY - 1  # try again with the next attempt
            log.warning("storage.attempts_trim_failed", error=str(exc))


async def _upsert_on(
    conn: Conn, cipher: Cipher, accounts: Sequence[Account], origin: str
) -> list[Account]:
    """:meth:`AccountTable.upsert`'s statements, inside the caller's transaction."""
    done = await _import_on(conn, cipher, accounts, True, origin)
    return [imported.account for imported in done if imported.account is not None]


async def _import_on(
    conn: Conn, cipher: Cipher, accounts: Sequence[Account], replace_existing: bool, origin: str
) -> list[Imported]:
    """Each account upserted (or, existing and not to be replaced, left), in order."""
    done: list[Imported] = []
    for account in accounts:
        if not replace_existing:
            found = await conn.fetchrow(
                "SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE", account.account_id
            )
            if found is not None:
                done.append(Imported(account.account_id, True, None))
                continue
        values = account_values(
            cipher, replace(account, version=1), INSERT_COLUMNS, forms=POSTGRES_FORMS
        )
        record = await conn.fetchrow(UPSERT, *values, origin)
        assert record is not None  # an upsert always returns its row
        stored = replace(
            account,
            id=record["id"],
            version=record["version"],
            created_at=record["created_at"],
            last_failure_at=record["last_failure_at"],
        )
        done.append(Imported(account.account_id, bool(record["existed"]), stored))
    return done
