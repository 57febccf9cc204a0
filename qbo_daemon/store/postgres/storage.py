""":class:`PostgresStorage`: accounts, OAuth states and refresh attempts in one PostgreSQL database.

It implements the storage port (:class:`~qbo_daemon.store.port.AccountStore`)
as the SQLite ``Storage`` (``store/repository.py``) does, with the same names
and value types, so either serves the same callers and one test suite runs
against both (``tests/store/test_shared.py``). It decides nothing: every row
it stores is the one the engine's policy decided.

Several daemons may share the database: every write is a single statement or
one transaction, a token write is a compare-and-swap on ``version``, and a
connect, import, refresh or disconnect notifies ``qbo_account`` with the
``account_id`` when it commits (:meth:`PostgresStorage.listen`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from qbo_daemon.core.models import Account
from qbo_daemon.store.crypto import Cipher
from qbo_daemon.store.port import (
    AccountChange,
    AccountWrite,
    Attempt,
    Claim,
    ClaimedState,
    ClaimResult,
    Imported,
    NodeInfo,
    RealmPolicy,
    ScheduleEntry,
    StateRecord,
)
from qbo_daemon.store.postgres.accounts import CHANNEL, AccountTable
from qbo_daemon.store.postgres.claims import NODES_CHANNEL, ClaimTable
from qbo_daemon.store.postgres.database import PgDatabase, PgSettings
from qbo_daemon.store.postgres.rows import account_change
from qbo_daemon.store.postgres.states import OAuthStates
from qbo_daemon.store.postgres.status_queries import PgStatusQueries

__all__ = ["PgSettings", "PostgresStorage"]


class PostgresStorage:
    """Accounts, OAuth states and refresh attempts in one PostgreSQL database."""

    def __init__(
        self, database: PgDatabase, cipher: Cipher, *, attempts_keep: int, node_id: str
    ) -> None:
        self.where = database.where  # the URL with its password masked
        self.node_id = node_id
        self._db = database
        self._accounts = AccountTable(
            database, cipher, attempts_keep=attempts_keep, node_id=node_id
        )
        self._claims = ClaimTable(database, cipher, node_id)
        self._states = OAuthStates(database)
        self._on_change: Callable[[AccountChange | None], None] | None = None
        # The status page's reads (no token column), with whichever keys are current.
        self.status_page = PgStatusQueries(database, lambda: self._accounts.cipher)

    @classmethod
    async def open(
        cls,
        url: str,
        cipher: Cipher,
        *,
        attempts_keep: int = 100_000,
        settings: PgSettings | None = None,
        node_id: str | None = None,
    ) -> PostgresStorage:
        """Connect to the database at ``url``, creating or migrating its tables.

        ``node_id`` names this process among the daemons sharing the database
        (``[cluster] node_id``); by default its host name and PID.
        """
        database = await PgDatabase.open(url, settings)
        node = node_id or f"{socket.gethostname()}:{os.getpid()}"
        storage = cls(database, cipher, attempts_keep=attempts_keep, node_id=node)
        try:
            await storage._accounts.fill_realm_digests()
        except BaseException:
            await storage.close()
            raise
        return storage

    async def close(self) -> None:
        """Let the writes in flight commit, then close every connection."""
        await self._db.close()

    @property
    def cipher(self) -> Cipher:
        return self._accounts.cipher

    @property
    def primary_key_id(self) -> str:
        return self._accounts.cipher.primary_key_id

    def use_cipher(self, cipher: Cipher) -> None:
        """A reload's keys: used for every read and write from now on."""
        self._accounts.cipher = cipher
        self._claims.cipher = cipher

    # -- several daemons (store.port.ClaimStore) -------------------------------------

    async def listen(self, callback: Callable[[AccountChange | None], None]) -> None:
        """Call ``callback`` after each committed change of an account, any node's.

        ``callback(None)`` says changes may have been missed (the LISTEN
        connection was cut and is back): read again what depends on them.
        """
        self._on_change = callback

        def changed(payload: str) -> None:
            change = account_change(payload)
            if change is not None:
                callback(change)

        await self._db.listen(CHANNEL, changed)

    async def listen_nodes(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(node_id)`` when a node comes up or leaves (any node, this one too)."""
        await self._db.listen(NODES_CHANNEL, callback)

    async def claim(
        self, account_id: str, *, lease: float, due_by: datetime | None = None
    ) -> ClaimResult | None:
        """Claim ``account_id`` for one attempt, or say who holds it; None if it is gone."""
        return await self._claims.claim(account_id, lease=lease, due_by=due_by)

    async def release(self, claim: Claim) -> None:
        """End ``claim`` without a write (no call was made), if it is still held."""
        await self._claims.release(claim)

    async def join(self, live_within: float) -> None:
        """Refuse to start as a node id another live process is using (:class:`ConfigError`)."""
        await self._claims.join(live_within)

    async def heartbeat(self) -> list[NodeInfo]:
        """Say this node is alive (and listen again if the server cut it); every node's row."""
        if await self._db.relisten() and self._on_change is not None:
            self._on_change(None)
        return await self._claims.heartbeat()

    async def leave(self) -> None:
        """Remove this node's heartbeat row (a clean shutdown)."""
        await self._claims.leave()

    # -- reading ---------------------------------------------------------------------

    async def load(self, account_id: str) -> Account:
        """The account with its secrets decrypted; :class:`AccountNotFoundError` if none."""
        return await self._accounts.load(account_id)

    async def find(self, account_id: str) -> Account | None:
        return await self._accounts.find(account_id)

    async def list_accounts(self) -> list[Account]:
        """Every account, ordered by ``account_id``; tokens are not decrypted (they are None)."""
        return await self._accounts.list_accounts()

    async def schedule_entries(
        self, until: datetime | None = None, *, after: datetime | None = None
    ) -> list[ScheduleEntry]:
        """Every account the scheduler should time (due after ``after`` and by ``until``)."""
        return await self._accounts.schedule_entries(until, after=after)

    async def status_counts(self) -> dict[str, int]:
        return await self._accounts.status_counts()

    async def attempts(self, account_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """The newest attempts first, of one account or of all."""
        return await self._accounts.attempts(account_id, limit)

    async def existing_account_ids(self, account_ids: Sequence[str]) -> set[str]:
        """Which of ``account_ids`` are stored (a snapshot: for reports, not for writes)."""
        return await self._accounts.existing_ids(account_ids)

    async def verify_keys(self, cipher: Cipher | None = None) -> None:
        """Fail fast when a stored secret cannot be decrypted with the configured keys."""
        await self._accounts.verify_keys(cipher)

    async def ping(self) -> None:
        await self._db.fetchrow("SELECT 1")

    # -- writing -----------------------------------------------------------------------

    async def commit(self, write: AccountWrite) -> Account:
        """Store ``write`` (and its attempt) if the row is still at ``write.read_version``.

        Durable when it returns; :class:`StaleWriteError` (nothing written) when the
        row changed or is gone.
        """
        return await self._accounts.commit(
            write.account,
            write.read_version,
            tokens=write.tokens,
            attempt=write.attempt,
            claim=write.claim,
            keep_abandoned=write.keep_abandoned,
        )

    async def record_attempt(self, attempt: Attempt) -> None:
        """Record an attempt that changes no account (for example ``invalid_client``)."""
        await self._accounts.record_attempt(attempt)

    async def upsert_connection(self, account: Account) -> Account:
        """Store a new connection, or replace the credentials of an existing account."""
        (stored,) = await self._accounts.upsert([account])
        return stored

    async def import_connections(
        self, accounts: Sequence[Account], *, replace_existing: bool = True
    ) -> list[Imported]:
        """Imported connections in one transaction (all or nothing), in order."""
        return await self._accounts.import_(accounts, replace_existing=replace_existing)

    async def upsert_checked_connection(
        self, account: Account, policy: RealmPolicy
    ) -> tuple[Account, str | None]:
        """A connection from the callback: stored only if ``policy`` allows its company.

        Raises :class:`RealmConflictError` (nothing written) when another account
        holds the realm or the account held another one; returns the account and
        its previous realm when the connection changed it.
        """
        return await self._accounts.upsert_checked(account, policy)

    async def insert_accounts(self, accounts: Sequence[Account]) -> int:
        """New accounts in one ``COPY``: all or nothing; an existing one fails them all."""
        return await self._accounts.insert_new(accounts)

    async def reencrypt(self, *, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt up to ``batch`` rows not yet under the primary key: (done, still to do)."""
        return await self._accounts.reencrypt(batch=batch)

    # -- OAuth states --------------------------------------------------------------------

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
